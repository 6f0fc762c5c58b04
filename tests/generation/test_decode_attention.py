"""The compiled decode step's bounded cache read, and the release of kept decode state between rounds."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import Qwen2Config, Qwen2ForCausalLM

from sapo.generation import SamplingSettings, StaticCacheSampler, cut_after_eos
from sapo.generation.decode_attention import bucketed_span
from sapo.generation.decode_state import memory_tight, should_release, state_bytes

PAD, EOS = 0, 2
GREEDY = SamplingSettings(do_sample=False)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qwen2(vocab: int = 64):
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, initializer_range=0.5, pad_token_id=PAD,
                         eos_token_id=EOS, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).eval()


def contexts(lengths, vocab=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(7, vocab, (n,), generator=generator).tolist() for n in lengths]


def greedy_reference(model, rows, new_tokens):
    out = []
    for context in rows:
        ids = torch.tensor([context])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=[EOS])
        out.append(cut_after_eos(generated[0, len(context):].tolist(), {EOS}))
    return out


def test_bucketed_span_rounds_up_to_at_most_spans_lengths():
    assert [bucketed_span(n, 1280, 4) for n in (1, 320, 321, 700, 1024, 1280)] == [320, 320, 640, 960, 1280, 1280]
    assert {bucketed_span(n, 1280, 4) for n in range(1, 1281)} == {320, 640, 960, 1280}
    assert {bucketed_span(n, 256, 4) for n in range(1, 257)} == {64, 128, 192, 256}
    assert {bucketed_span(n, 1000, 3) for n in range(1, 1001)} == {384, 768, 1000}  # multiples of 64, then the end
    assert bucketed_span(5, 256, 1) == 256  # one span: the whole cache
    with pytest.raises(ValueError, match="spans must be >= 1"):
        bucketed_span(5, 256, 0)


class SpanBackend(CompileCounter):
    """A counting dynamo backend (one frame per compiled graph) that also records the key length of every
    attention call in each graph it is given, read from the traced graph itself."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[int] = []

    def __call__(self, gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
                self.spans.append(node.args[1].meta["example_value"].shape[-2])
        return super().__call__(gm, example_inputs)


@pytest.fixture()
def counted_compile(monkeypatch):
    """torch.compile with the counting backend and fullgraph=True (a graph break raises, and the sampler would fall
    back: the test sees it)."""
    backend = SpanBackend()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, backend=backend, fullgraph=True,
                                                                         dynamic=False))
    return backend


def test_the_compiled_step_reads_bucketed_spans_and_compiles_once_per_span(counted_compile):
    counter = counted_compile
    model = qwen2()
    sampler = StaticCacheSampler(GREEDY, pad_token_id=PAD, eos_token_ids=set(), batch_size=2, compile=True,
                                 compile_mode=None, cache_len=256, cache_spans=4)
    crossing = contexts([60, 50])  # written slots 60..69: prefill eager, steps at spans 64 then 128
    assert sampler.sample(model, crossing, 10) == greedy_reference(model, crossing, 10)
    assert sampler._compile_works and not sampler.compile_failed
    graphs = counter.frame_count
    assert graphs == 2  # one per span, not one per length
    assert counter.spans == [64, 128]  # one layer per graph; never the whole 256-slot cache
    again = contexts([8, 30], seed=1)  # a later call (new contexts, new WrittenSlots) at span 64: no recompile
    assert sampler.sample(model, again, 6) == greedy_reference(model, again, 6)
    assert counter.frame_count == graphs
    longer = contexts([200, 180], seed=2)  # spans 256 only: one more graph, still at most cache_spans in all
    assert sampler.sample(model, longer, 8) == greedy_reference(model, longer, 8)
    assert counter.frame_count == 3 <= sampler.cache_spans


def test_one_span_is_the_whole_cache(counted_compile):
    counter = counted_compile
    model = qwen2()
    sampler = StaticCacheSampler(GREEDY, pad_token_id=PAD, eos_token_ids=set(), batch_size=2, compile=True,
                                 compile_mode=None, cache_len=256, cache_spans=1)
    rows = contexts([60, 50])
    assert sampler.sample(model, rows, 10) == greedy_reference(model, rows, 10)
    assert counter.frame_count == 1 and counter.spans == [256]


def test_release_state_always_frees_and_rebuilds_the_decode_state(counted_compile):
    counter = counted_compile
    model = qwen2()
    kept = StaticCacheSampler(GREEDY, pad_token_id=PAD, eos_token_ids=set(), batch_size=2, compile=True,
                              compile_mode=None, cache_len=128, release_state="never")
    rows = contexts([10, 12])
    expected = greedy_reference(model, rows, 5)
    assert kept.sample(model, rows, 5) == expected
    assert kept._cache is not None and kept._compiled_steps and kept.releases == 0
    assert state_bytes(kept._cache) == 2 * 2 * 128 * 2 * 8 * 4  # keys+values x rows x slots x kv heads x dim x fp32

    freed = StaticCacheSampler(GREEDY, pad_token_id=PAD, eos_token_ids=set(), batch_size=2, compile=True,
                               compile_mode=None, cache_len=128, release_state="always")
    for round_ in range(1, 3):
        assert freed.sample(model, rows, 5) == expected  # re-created correctly after each release
        assert freed._cache is None and not freed._compiled_steps and freed.releases == round_
    assert not freed.compile_failed
    assert counter.frame_count == 1  # the re-created step reuses dynamo's graph (guards hold): no recompilation
    with pytest.raises(ValueError, match="release_state must be one of"):
        StaticCacheSampler(GREEDY, pad_token_id=PAD, eos_token_ids=set(), release_state="sometimes")


def test_the_auto_release_rule():
    gib = 2 ** 30
    assert memory_tight(available=2 * gib, total=80 * gib, kept=4 * gib)  # less left than the state holds
    assert memory_tight(available=7 * gib, total=80 * gib, kept=1 * gib)  # under a tenth of the device
    assert not memory_tight(available=20 * gib, total=80 * gib, kept=4 * gib)
    assert not memory_tight(available=0, total=80 * gib, kept=0)  # nothing kept, nothing to free
    cpu = torch.device("cpu")
    assert not should_release("auto", cpu, 10 * gib)  # no device figures on the CPU: keep
    assert should_release("always", cpu, 0) and not should_release("never", cpu, 10 * gib)
