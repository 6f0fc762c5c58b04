"""Samplers: `HFGenerateSampler` and `StaticCacheSampler` against plain `model.generate` and its warpers."""

import math
import warnings

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import sapo.generation.decode_attention
from sapo.generation import (
    CheckpointSampling,
    HFGenerateSampler,
    SamplingSettings,
    StaticCacheSampler,
    auto_engine,
    checkpoint_sampling,
    cut_after_eos,
    eos_token_ids_of,
    left_pad,
    make_sampler,
    penalize_repetitions,
    sample_from_logits,
    sampling_probabilities,
    seen_token_mask,
)
from sapo.generation.decode_attention import DECODE_ATTENTION, decode_attention, gqa_decode_attention, written_slots


def test_cut_after_eos():
    assert cut_after_eos([5, 6, 2, 7, 2], {2}) == [5, 6, 2]
    assert cut_after_eos([5, 6], {2}) == [5, 6]
    assert cut_after_eos([9, 5], {2, 9}) == [9]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def contexts_of(tokenizer):
    prompts = ["12+35=", "reverse: abcd", "sort: dcba zz"]
    return [tokenizer(f"<s><|user|>{p}<|assistant|>", add_special_tokens=False)["input_ids"] for p in prompts]


def test_greedy_batch_equals_unbatched_generate(tiny_model, tokenizer):
    contexts = contexts_of(tokenizer)
    eos = eos_token_ids_of(tokenizer, tiny_model)
    sampler = HFGenerateSampler(SamplingSettings(do_sample=False), pad_token_id=tokenizer.pad_token_id,
                                eos_token_ids=eos)
    batched = sampler.sample(tiny_model, contexts, max_new_tokens=10)
    for context, got in zip(contexts, batched, strict=True):
        ids = torch.tensor([context])
        out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))
        assert got == cut_after_eos(out[0, len(context):].tolist(), eos)


def test_sampling_is_seeded_and_varies(tiny_model, tokenizer):
    contexts = contexts_of(tokenizer) * 4
    sampler = HFGenerateSampler(SamplingSettings(temperature=1.0, top_k=0, top_p=1.0),
                                pad_token_id=tokenizer.pad_token_id, eos_token_ids={tokenizer.eos_token_id},
                                batch_size=5)
    torch.manual_seed(3)
    first = sampler.sample(tiny_model, contexts, max_new_tokens=8)
    torch.manual_seed(3)
    second = sampler.sample(tiny_model, contexts, max_new_tokens=8)
    assert first == second
    assert len({tuple(s) for s in first}) > 3  # an untrained model sampled at T=1 does not repeat itself
    assert all(len(s) <= 8 for s in first)
    tiny_model.train()  # the sampler switches to eval for decoding and must restore training mode
    sampler.sample(tiny_model, contexts[:1], max_new_tokens=2)
    assert tiny_model.training


# ------------------------------------------------------------------------------------------------
# StaticCacheSampler: same tokens as `generate` (greedy), same distribution (sampling)
# ------------------------------------------------------------------------------------------------

PAD, EOS = 0, 2


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning threads made
    this file 20x slower; the setting is restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_decoder(kind: str, vocab_size: int, seed: int = 0):
    """A tiny Llama or Qwen2 (grouped-query attention) with weights large enough that greedy decoding varies."""
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[kind]
    config = config_class(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                          initializer_range=0.5, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
                          tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


@pytest.fixture(params=["llama", "qwen2"], scope="module")
def decoder(request, tokenizer):
    return build_decoder(request.param, len(tokenizer))


def varied_contexts(vocab_size: int, count: int = 6, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 9, 25, 1, 12, 6, 20][:count]
    return [torch.randint(7, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def reference_greedy(model, contexts, max_new_tokens, eos):
    """Plain `model.generate`, one unpadded context at a time (the ground truth)."""
    outputs = []
    for context in contexts:
        ids = torch.tensor([context])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=PAD, eos_token_id=sorted(eos))
        outputs.append(cut_after_eos(out[0, len(context):].tolist(), eos))
    return outputs


def test_static_greedy_matches_generate(decoder, tokenizer):
    contexts = varied_contexts(len(tokenizer))
    max_new = 14
    # Make one row stop early: declare the 4th greedy token of row 0 an EOS as well.
    plain = reference_greedy(decoder, contexts, max_new, {EOS})
    early = plain[0][3]
    assert early not in plain[0][:3]
    eos = {EOS, early}
    expected = reference_greedy(decoder, contexts, max_new, eos)
    assert len(expected[0]) == 4 and expected[0][-1] == early
    assert any(len(row) == max_new for row in expected)  # and some rows run to the max_new_tokens bound
    for batch_size, check_every in ((None, 16), (4, 1), (4, 3), (1, 5)):
        sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids=eos,
                                     batch_size=batch_size, check_every=check_every)
        assert sampler.sample(decoder, contexts, max_new) == expected, (batch_size, check_every)
    hf = HFGenerateSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids=eos, batch_size=3)
    assert hf.sample(decoder, contexts, max_new) == expected


def test_static_greedy_stops_early_and_respects_the_bound(decoder, tokenizer):
    contexts = varied_contexts(len(tokenizer), count=4)
    first_tokens = [row[0] for row in reference_greedy(decoder, contexts, 1, {EOS})]
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD,
                                 eos_token_ids=set(first_tokens), check_every=2)
    assert sampler.sample(decoder, contexts, 40) == [[t] for t in first_tokens]
    assert sampler.last_stats["decode_steps"] == 2  # every row ended at once: the loop stopped at its first check
    bounded = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS})
    assert [len(r) <= 1 for r in bounded.sample(decoder, contexts, 1)] == [True] * 4
    assert bounded.sample(decoder, contexts, 0) == [[]] * 4
    assert bounded.sample(decoder, [], 5) == []
    with pytest.raises(ValueError, match="at least one token"):
        bounded.sample(decoder, [[5], []], 3)


def test_static_sampler_restores_mode_and_runs_in_bf16(tokenizer):
    model = build_decoder("llama", len(tokenizer)).to(torch.bfloat16).train()
    sampler = StaticCacheSampler(SamplingSettings(), pad_token_id=PAD, eos_token_ids={EOS}, batch_size=2)
    out = sampler.sample(model, varied_contexts(len(tokenizer), count=3), 6)
    assert model.training
    assert len(out) == 3 and all(0 < len(row) <= 6 for row in out)
    assert all(0 <= t < len(tokenizer) for row in out for t in row)


def test_static_greedy_matches_generate_under_lora(tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_decoder("llama", len(tokenizer)),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False)).eval()
    contexts = varied_contexts(len(tokenizer), count=4)
    hf = HFGenerateSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS})
    static = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS})
    assert static.sample(model, contexts, 8) == hf.sample(model, contexts, 8)


def hf_filtered_probs(logits: torch.Tensor, settings: SamplingSettings, min_p: float | None = None) -> torch.Tensor:
    """The distribution `generate` samples from: its own warpers, in its own order, then softmax."""
    scores = logits.float()
    if settings.temperature != 1.0:
        scores = TemperatureLogitsWarper(settings.temperature)(None, scores)
    if settings.top_k > 0:
        scores = TopKLogitsWarper(settings.top_k)(None, scores)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores.softmax(-1)


SETTINGS = [
    SamplingSettings(temperature=0.7, top_k=50, top_p=0.95),
    SamplingSettings(temperature=1.0, top_k=0, top_p=1.0),
    SamplingSettings(temperature=1.3, top_k=5, top_p=1.0),
    SamplingSettings(temperature=0.5, top_k=0, top_p=0.8),
    SamplingSettings(temperature=1.0, top_k=5000, top_p=0.5),  # top_k above the vocabulary size
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_sampling_probabilities_equal_generate_warpers(settings):
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 3
    ours, theirs = sampling_probabilities(logits, settings), hf_filtered_probs(logits, settings)
    assert torch.equal(ours > 0, theirs > 0)  # the same support
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_top_k_top_p_never_sample_outside_the_allowed_set():
    probs = torch.tensor([0.05, 0.5, 0.0001, 0.2, 0.15, 0.0999, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20000, -1).clone()
    torch.manual_seed(0)
    cases = [  # settings, allowed tokens
        (SamplingSettings(temperature=1.0, top_k=3, top_p=1.0), {1, 3, 4}),
        (SamplingSettings(temperature=1.0, top_k=0, top_p=0.6), {1, 3}),  # 0.5 < 0.6 <= 0.5 + 0.2
        (SamplingSettings(temperature=1.0, top_k=2, top_p=0.4), {1}),
        (SamplingSettings(temperature=2.0, top_k=4, top_p=1.0), {1, 3, 4, 5}),
        (SamplingSettings(temperature=0.7, top_k=1, top_p=1.0), {1}),
    ]
    for settings, allowed in cases:
        drawn = sample_from_logits(logits, settings)
        assert set(drawn.unique().tolist()) == allowed, settings
    assert (sample_from_logits(logits, SamplingSettings(do_sample=False)) == 1).all()


def assert_matches_distribution(samples: torch.Tensor, expected: torch.Tensor, sigmas: float = 5.0) -> None:
    """Empirical frequencies within `sigmas` binomial standard deviations of `expected`; no impossible token."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=expected.numel()).double() / n
    assert counts[expected == 0].sum() == 0
    tolerance = sigmas * (expected.double() * (1 - expected.double()) / n).sqrt() + 1e-3
    assert ((counts - expected.double()).abs() <= tolerance).all(), (counts, expected)


def first_tokens(sampler, model, context, rows=2000):
    return torch.tensor([row[0] for row in sampler.sample(model, [context] * rows, 1)])


FIRST_TOKEN_SETTINGS = [SETTINGS[0], SamplingSettings(temperature=1.0, top_k=0, top_p=0.9)]


@pytest.mark.parametrize("settings", FIRST_TOKEN_SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_first_token_distribution_matches_filtered_softmax(decoder, tokenizer, settings):
    context = varied_contexts(len(tokenizer), count=2)[1]
    with torch.no_grad():
        logits = decoder(input_ids=torch.tensor([context])).logits[0, -1]
    expected = hf_filtered_probs(logits[None], settings)[0]
    assert 3 <= int((expected > 0).sum()) < len(tokenizer) - 10  # the filters matter for this context
    torch.manual_seed(1)
    static = StaticCacheSampler(settings, pad_token_id=PAD, eos_token_ids=set())
    assert_matches_distribution(first_tokens(static, decoder, context), expected)


def test_generate_first_token_distribution_is_the_same(tokenizer):
    """The reference side of the comparison: `generate` draws from that same filtered softmax."""
    model, settings = build_decoder("llama", len(tokenizer)), SETTINGS[0]
    context = varied_contexts(len(tokenizer), count=2)[1]
    with torch.no_grad():
        expected = hf_filtered_probs(model(input_ids=torch.tensor([context])).logits[:, -1], settings)[0]
    torch.manual_seed(1)
    hf = HFGenerateSampler(settings, pad_token_id=PAD, eos_token_ids={EOS})
    assert_matches_distribution(first_tokens(hf, model, context), expected)


def test_later_tokens_match_generate_statistically(tokenizer):
    """Two-sample check on the 3rd token and on the length (EOS timing) of longer samples."""
    model = build_decoder("qwen2", len(tokenizer), seed=1)
    settings = SamplingSettings(temperature=1.0, top_k=20, top_p=0.9)
    contexts = [varied_contexts(len(tokenizer), count=2)[0]] * 2000
    eos = {EOS, 40, 41, 42, 43}
    torch.manual_seed(2)
    ours = StaticCacheSampler(settings, pad_token_id=PAD, eos_token_ids=eos).sample(model, contexts, 6)
    theirs = HFGenerateSampler(settings, pad_token_id=PAD, eos_token_ids=eos).sample(model, contexts, 6)

    def third_tokens(samples):
        return torch.tensor([row[2] for row in samples if len(row) > 2])

    def frequencies(values, size):
        return torch.bincount(values, minlength=size).double() / max(1, values.numel())

    a, b = third_tokens(ours), third_tokens(theirs)
    assert min(a.numel(), b.numel()) > 500
    pooled = (frequencies(a, len(tokenizer)) + frequencies(b, len(tokenizer))) / 2
    spread = (pooled * (1 - pooled) * (1 / a.numel() + 1 / b.numel())).sqrt()
    assert ((frequencies(a, len(tokenizer)) - frequencies(b, len(tokenizer))).abs() <= 5 * spread + 2e-3).all()
    mean_a = sum(map(len, ours)) / len(ours)
    mean_b = sum(map(len, theirs)) / len(theirs)
    assert abs(mean_a - mean_b) < 6 * 2.5 / math.sqrt(len(ours))  # lengths lie in [1, 6]: sd <= 2.5


# ------------------------------------------------------------------------------------------------
# The model's generation_config: applied by both engines (repetition_penalty, min_p) or refused by "static"
# ------------------------------------------------------------------------------------------------


def tied_scores_and_history(vocab_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits full of ties (rounded to quarters, as bf16 logits are rounded) plus one unrounded row, with
    the 1st, 5th, 20th and 50th largest values shared by the next two tokens in rows 0 and 5, and a
    left-padded history of earlier tokens; the padding holds real token ids, which must not be penalized."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, vocab_size, generator=generator) * 3
    logits[:5] = (logits[:5] * 4).round() / 4
    for row in (0, 5):
        order = logits[row].argsort(descending=True)
        for k in (1, 5, 20, 50):
            logits[row, order[k:k + 2]] = logits[row, order[k - 1]].item()
    history = torch.randint(0, vocab_size, (6, 40), generator=generator)
    mask = torch.ones_like(history)
    mask[1, :15] = 0
    mask[4, :39] = 0
    return logits, history, mask


def assert_equal_up_to_ties(scores: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Per group of equal scores, the same number of tokens kept and the same total probability.

    Which of several tied tokens top-p keeps is tie-breaking, and transformers' unstable sort breaks ties
    arbitrarily: only the number kept (and so the probabilities) is defined there.
    """
    for row in range(scores.shape[0]):
        _, group = scores[row].unique(return_inverse=True)
        totals = torch.zeros(4, int(group.max()) + 1, dtype=torch.float64)
        for line, values in enumerate((ours[row] > 0, theirs[row] > 0, ours[row], theirs[row])):
            totals[line].index_add_(0, group, values.double())
        assert torch.equal(totals[0], totals[1]), row
        torch.testing.assert_close(totals[2], totals[3], atol=1e-6, rtol=0)


TIE_SETTINGS = [*SETTINGS, SamplingSettings(temperature=0.7, top_k=1, top_p=0.5),
                SamplingSettings(temperature=1.0, top_k=20, top_p=0.3)]


@pytest.mark.parametrize("min_p", [None, 0.2])
@pytest.mark.parametrize("penalty", [1.0, 1.4])
@pytest.mark.parametrize("settings", TIE_SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_processed_probabilities_equal_transformers_processors(settings, penalty, min_p):
    """Repetition penalty, temperature, top-k, top-p, min_p: the static engine's distribution is the one of
    transformers' own processors chained in `generate`'s order, on logits with many ties."""
    logits, history, mask = tied_scores_and_history()
    ours_logits, scores = logits, logits.clone()
    if penalty != 1.0:
        ignored = (mask != 0).int().argmax(dim=1)  # what generate passes for left padding
        scores = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ignored)(history, scores)
        ours_logits = penalize_repetitions(logits, seen_token_mask(history, mask, logits.shape[-1]), penalty)
        assert torch.equal(ours_logits, scores)
    if 0 < settings.top_k < logits.shape[-1]:  # ties straddle the k-th value: top-k must keep them all
        kth = scores.topk(settings.top_k, dim=-1).values[..., -1:]
        assert ((scores >= kth).sum(-1) > settings.top_k).any()
    ours = sampling_probabilities(ours_logits, settings, min_p)
    theirs = hf_filtered_probs(scores, settings, min_p)
    assert_equal_up_to_ties(scores, ours, theirs)
    if settings.top_p == 1.0:  # nothing depends on tie-breaking: equal token by token
        assert torch.equal(ours > 0, theirs > 0)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5, 2.0, 2.0]])
    for top_p in (1.0, 0.999):
        probs = sampling_probabilities(logits, SamplingSettings(temperature=1.0, top_k=2, top_p=top_p))
        assert (probs > 0).tolist() == [[True, False, True, True, False, True, True]]


def test_seen_token_mask_skips_left_padding_and_ids_beyond_the_logits():
    ids = torch.tensor([[7, 7, 1, 2], [3, 9, 9, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seen = seen_token_mask(ids, mask, vocab_size=8)
    assert seen.tolist() == [[i in (1, 2) for i in range(8)], [i in (3, 4) for i in range(8)]]


def test_checkpoint_sampling_reads_applies_and_refuses():
    assert checkpoint_sampling(None, True) == checkpoint_sampling(GenerationConfig(), True) == CheckpointSampling()
    common = GenerationConfig(do_sample=True, temperature=0.6, top_k=20, top_p=0.8, repetition_penalty=1.1,
                              min_p=0.05, renormalize_logits=True, num_return_sequences=3, max_length=7)
    assert checkpoint_sampling(common, True) == CheckpointSampling(repetition_penalty=1.1, min_p=0.05)
    assert checkpoint_sampling(common, False) == CheckpointSampling(repetition_penalty=1.1)  # min_p: a warper
    typical = GenerationConfig(typical_p=0.9)
    assert checkpoint_sampling(typical, False) == CheckpointSampling()  # generate ignores warpers when greedy
    with pytest.raises(ValueError, match=r"typical_p=0\.9.*generation_engine: hf"):
        checkpoint_sampling(typical, True)
    with pytest.raises(ValueError, match=r"forced_eos_token_id=2, suppress_tokens=\[5\]|"
                                         r"suppress_tokens=\[5\].*forced_eos_token_id=2"):
        checkpoint_sampling(GenerationConfig(suppress_tokens=[5], forced_eos_token_id=2), False)


def decoder_with(kind: str, vocab_size: int, **generation_fields):
    """`build_decoder` with `generation_fields` set in its generation_config, as generation_config.json can."""
    model = build_decoder(kind, vocab_size)
    for name, value in generation_fields.items():
        setattr(model.generation_config, name, value)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_checkpoint_repetition_penalty_gives_the_same_greedy_tokens_in_both_engines(kind, tokenizer):
    contexts = varied_contexts(len(tokenizer))
    model = decoder_with(kind, len(tokenizer), repetition_penalty=1.8)
    expected = reference_greedy(model, contexts, 12, {EOS})
    assert expected != reference_greedy(build_decoder(kind, len(tokenizer)), contexts, 12, {EOS})  # it matters
    for batch_size in (None, 4):
        static = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS},
                                    batch_size=batch_size)
        assert static.sample(model, contexts, 12) == expected, batch_size
    hf = HFGenerateSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS}, batch_size=4)
    assert hf.sample(model, contexts, 12) == expected


def test_checkpoint_min_p_and_penalty_give_the_same_sampling_distribution_in_both_engines(tokenizer):
    penalty, min_p, settings = 2.0, 0.15, SamplingSettings(temperature=1.0, top_k=50, top_p=0.95)
    model = decoder_with("qwen2", len(tokenizer), repetition_penalty=penalty, min_p=min_p)
    context = varied_contexts(len(tokenizer), count=3)[2]  # its likely next tokens occur in it
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[:, -1]
    penalized = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([context]), logits.clone())
    expected = hf_filtered_probs(penalized, settings, min_p)[0]
    # Both fields change the distribution by far more than sampling noise, so ignoring either would show.
    assert hf_filtered_probs(penalized, settings)[0][expected == 0].sum() > 0.02
    assert (hf_filtered_probs(logits, settings, min_p)[0] - expected).abs().sum() > 0.3
    torch.manual_seed(1)
    for sampler in (StaticCacheSampler(settings, pad_token_id=PAD, eos_token_ids=set()),
                    HFGenerateSampler(settings, pad_token_id=PAD, eos_token_ids=set())):
        assert_matches_distribution(first_tokens(sampler, model, context), expected)


def test_static_engine_refuses_what_it_does_not_implement_and_hf_still_runs(tokenizer):
    contexts = varied_contexts(len(tokenizer), count=3)
    model = decoder_with("llama", len(tokenizer), no_repeat_ngram_size=3)
    static = StaticCacheSampler(SamplingSettings(), pad_token_id=PAD, eos_token_ids={EOS})
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size=3.*generation_engine: hf"):
        static.sample(model, contexts, 4)
    hf = HFGenerateSampler(SamplingSettings(), pad_token_id=PAD, eos_token_ids={EOS})
    assert len(hf.sample(model, contexts, 4)) == 3


def test_fields_sapo_sets_itself_are_ignored_by_both_engines(tokenizer):
    """A checkpoint's decoding strategy fields never reach either engine: one greedy row per context."""
    contexts = varied_contexts(len(tokenizer), count=3)
    expected = reference_greedy(build_decoder("llama", len(tokenizer)), contexts, 6, {EOS})
    model = decoder_with("llama", len(tokenizer), num_return_sequences=2, return_dict_in_generate=True,
                         temperature=0.3, top_k=3, min_new_tokens=5, max_new_tokens=2)
    for sampler in (HFGenerateSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS}),
                    StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS})):
        assert sampler.sample(model, contexts, 6) == expected


def test_make_sampler():
    settings = SamplingSettings()
    assert isinstance(make_sampler("hf", settings, PAD, {EOS}, 4), HFGenerateSampler)
    static = make_sampler("static", settings, PAD, {EOS}, 4, check_every=4)
    assert isinstance(static, StaticCacheSampler) and static.batch_size == 4 and static.check_every == 4
    assert not static.uses_compile(torch.device("cpu"))
    assert static.uses_compile(torch.device("cuda")) if static.compile is None else True
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("vllm", settings, PAD, {EOS})


@pytest.mark.slow
def test_compiled_static_sampler_on_cpu_matches_generate(tokenizer):
    """`torch.compile` of the decode step (inductor on CPU: no CUDA graphs) decodes the same tokens."""
    model = build_decoder("llama", len(tokenizer))
    contexts = varied_contexts(len(tokenizer))
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS},
                                 batch_size=4, compile=True, compile_mode=None)
    assert sampler.sample(model, contexts, 10) == reference_greedy(model, contexts, 10, {EOS})
    assert sampler._compile_works and not sampler._compile_failed
    model.to(torch.bfloat16)  # same module, new dtype: the kept cache must not be reused
    assert all(0 < len(row) <= 10 for row in sampler.sample(model, contexts, 10))
    assert not sampler._compile_failed


def test_the_compiled_decode_step_is_one_graph(tokenizer, monkeypatch):
    """CUDA graphs need the decode step captured whole: anything in it that dynamo cannot trace (a ContextVar read
    in the attention function once did) splits it at every layer. Compiled here with fullgraph=True, which raises
    at the first graph break (the sampler would then fall back, and the test sees it)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **{**options, "fullgraph": True}))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=PAD, eos_token_id=EOS)
    model = Qwen2ForCausalLM(config).eval()  # grouped-query attention (the query-reshape path); one layer: quick
    contexts = varied_contexts(len(tokenizer), count=2)
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS},
                                 batch_size=2, compile=True, compile_mode=None)
    assert sampler.sample(model, contexts, 4) == reference_greedy(model, contexts, 4, {EOS})
    assert sampler._compile_works and not sampler.compile_failed


@pytest.mark.slow
def test_compiled_static_sampler_applies_the_repetition_penalty(tokenizer):
    """The seen-token mask of the repetition penalty flows through the compiled decode step."""
    model = decoder_with("llama", len(tokenizer), repetition_penalty=1.8)
    contexts = varied_contexts(len(tokenizer))
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS},
                                 batch_size=4, compile=True, compile_mode=None)
    assert sampler.sample(model, contexts, 10) == reference_greedy(model, contexts, 10, {EOS})
    assert sampler._compile_works and not sampler._compile_failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_static_sampler_applies_the_repetition_penalty(tokenizer):
    """Under CUDA graphs too, where the seen-token mask is an output of one replay and an input of the next."""
    model = decoder_with("qwen2", len(tokenizer), repetition_penalty=1.8).cuda()
    contexts = varied_contexts(len(tokenizer))
    expected = reference_greedy(model, contexts, 24, {EOS})
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS},
                                 batch_size=8)
    for _ in range(2):  # the second call replays the captured graphs
        assert sampler.sample(model, contexts, 24) == expected
    assert sampler._compile_works and not sampler._compile_failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_compiled_static_sampler(kind, tokenizer):
    """On CUDA: compiled decode (CUDA graphs) gives generate's greedy tokens in fp32, and the decode loop
    synchronises with the host only at its every-`check_every`-steps exit check."""
    model = build_decoder(kind, len(tokenizer)).cuda()
    contexts = varied_contexts(len(tokenizer))
    expected = reference_greedy(model, contexts, 24, {EOS})
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS},
                                 batch_size=8)
    assert sampler.uses_compile(torch.device("cuda"))
    for _ in range(2):  # the second call replays the captured graphs
        assert sampler.sample(model, contexts, 24) == expected
    assert sampler._compile_works and not sampler._compile_failed
    sampled = make_sampler("static", SamplingSettings(), PAD, {EOS}, 8).sample(model.to(torch.bfloat16), contexts, 24)
    assert all(0 < len(row) <= 24 for row in sampled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_loop_syncs_only_at_its_checks(tokenizer):
    """The eager decode loop on CUDA: extra decode steps add host synchronisations only at the EOS checks."""
    model = build_decoder("llama", len(tokenizer)).cuda()
    contexts = varied_contexts(len(tokenizer))
    sampler = StaticCacheSampler(SamplingSettings(), pad_token_id=PAD, eos_token_ids=set(), compile=False,
                                 check_every=8)

    def syncs(max_new_tokens: int) -> int:
        sampler.sample(model, contexts, max_new_tokens)  # warm-up (allocations, lazy initialisation)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sampler.sample(model, contexts, max_new_tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    short, long = syncs(16), syncs(80)
    assert long - short <= (80 - 16) // 8 + 1, (short, long)


def test_engine_names_are_the_registry():
    from sapo.generation import ENGINES, SAMPLER_NAMES

    assert tuple(ENGINES) == SAMPLER_NAMES


# ------------------------------------------------------------------------------------------------
# "auto": the engine per device type, with a fallback to generate when compiling fails
# ------------------------------------------------------------------------------------------------


def test_auto_engine_follows_the_measured_rule_and_respects_the_generation_config():
    assert auto_engine("cuda", True) == auto_engine(torch.device("cuda:1"), False) == "static"
    assert auto_engine("cpu", True) == auto_engine("cpu", False) == "static"
    assert auto_engine("mps", True) == "hf"  # not measured: generate
    assert auto_engine("cuda", True, GenerationConfig(typical_p=0.9)) == "hf"  # only generate implements it
    assert auto_engine("cuda", False, GenerationConfig(typical_p=0.9)) == "static"  # greedy ignores warpers


def test_make_sampler_auto_gives_the_static_engine_a_generate_fallback():
    auto = make_sampler("auto", SamplingSettings(), PAD, {EOS}, 16, device="cuda", cache_len=96)
    assert isinstance(auto, StaticCacheSampler) and isinstance(auto.fallback, HFGenerateSampler)
    assert (auto.batch_size, auto.cache_len, auto.fallback.batch_size) == (16, 96, 16)
    plain = make_sampler("auto", SamplingSettings(), PAD, {EOS}, 16, device="mps", cache_len=96)
    assert isinstance(plain, HFGenerateSampler)  # the static engine's options are dropped
    with pytest.raises(TypeError, match="takes no options"):
        make_sampler("hf", SamplingSettings(), PAD, {EOS}, cache_len=96)


def test_failed_compilation_falls_back_to_generate_with_one_warning(tokenizer, caplog):
    model = build_decoder("qwen2", len(tokenizer))
    contexts = varied_contexts(len(tokenizer), count=4)
    expected = reference_greedy(model, contexts, 8, {EOS})
    greedy = SamplingSettings(do_sample=False)
    fallback = HFGenerateSampler(greedy, pad_token_id=PAD, eos_token_ids={EOS})
    # An unknown compile mode makes torch.compile itself raise, as a backend failure would.
    sampler = StaticCacheSampler(greedy, pad_token_id=PAD, eos_token_ids={EOS}, batch_size=4, compile=True,
                                 compile_mode="no-such-mode", fallback=fallback)
    with caplog.at_level("WARNING", logger="sapo.generation"):
        assert sampler.sample(model, contexts, 8) == expected
        assert sampler.sample(model, contexts, 8) == expected
    warnings_logged = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_logged) == 1 and "model.generate" in warnings_logged[0].getMessage()
    assert sampler.compile_failed and not sampler.keeps_state(torch.device("cpu"))
    assert sampler._cache is None and not sampler._compiled_steps  # nothing kept once it gave up


def test_eager_decoding_frees_its_cache_between_calls(decoder, tokenizer):
    sampler = StaticCacheSampler(SamplingSettings(), pad_token_id=PAD, eos_token_ids={EOS}, batch_size=4,
                                 cache_len=512)
    assert not sampler.keeps_state(torch.device("cpu"))
    sampler.sample(decoder, varied_contexts(len(tokenizer)), 5)
    assert sampler._cache is None


# ------------------------------------------------------------------------------------------------
# Grouped-query attention in the decode step: a reshaped query instead of a repeated KV cache
# ------------------------------------------------------------------------------------------------


def attention_inputs(batch=3, heads=6, kv_heads=2, q_len=1, kv_len=11, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, kv_len, dim, generator=generator) for _ in range(2))
    mask = torch.rand(batch, 1, q_len, kv_len, generator=generator) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    return query, key, value, mask


class GroupedModule(torch.nn.Module):
    """What an attention layer exposes to an `AttentionInterface` function."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


def repeated_kv_attention(query, key, value, mask, scaling):
    """transformers' fallback under compile: K/V repeated per query head, then plain SDPA."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("additive", [False, True])
def test_gqa_decode_attention_equals_attention_over_a_repeated_cache(additive):
    query, key, value, mask = attention_inputs()
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    out, _ = gqa_decode_attention(GroupedModule(3), query, key, value, mask, scaling=0.3)
    assert out.shape == (3, 1, 6, 8)
    torch.testing.assert_close(out, repeated_kv_attention(query, key, value, mask, 0.3), atol=1e-6, rtol=1e-5)
    # Prefill (several query tokens) goes to transformers' own SDPA function: the same numbers.
    query, key, value, mask = attention_inputs(q_len=5)
    out, _ = gqa_decode_attention(GroupedModule(3), query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(out, repeated_kv_attention(query, key, value, mask, 0.3), atol=1e-6, rtol=1e-5)


def attention_implementations_seen(model, action):
    """The attention implementation every attention layer of `model` runs with during `action()`."""
    seen = []
    hooks = [module.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
             for name, module in model.named_modules() if name.endswith("self_attn")]
    try:
        action()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_static_sampler_decodes_sdpa_models_with_its_own_path_only_while_decoding(tokenizer):
    model = build_decoder("qwen2", len(tokenizer))
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    contexts = varied_contexts(len(tokenizer), count=4)
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids={EOS})
    seen = attention_implementations_seen(model, lambda: sampler.sample(model, contexts, 6))
    assert seen and set(seen) == {DECODE_ATTENTION}
    assert model.config._attn_implementation == "sdpa"  # restored: training forwards never see it
    assert attention_implementations_seen(model, lambda: model(torch.tensor([contexts[0]]))) == ["sdpa"] * 2
    full_heads = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=2,
                                              intermediate_size=32)).eval()
    with decode_attention(full_heads) as replaced:  # full heads too: eager steps read the written slots only
        assert replaced and full_heads.config._attn_implementation == DECODE_ATTENTION
    assert full_heads.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with decode_attention(model) as replaced:  # only SDPA is replaced; eager is left as chosen
        assert not replaced and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("groups", [1, 3])
def test_written_slots_give_the_attention_of_the_whole_cache_with_its_tail_masked(groups):
    """Unwritten slots hold anything (here random keys); masked, they must not matter, and cut, they are not read."""
    query, key, value, mask = attention_inputs(heads=2 * groups, q_len=1, kv_len=11)
    mask[..., 7:] = False  # slots 7.. unwritten: transformers masks them
    expected = repeated_kv_attention(query, key, value, mask, 0.3)
    with written_slots(cache_len=11) as slots:
        slots.written = 7
        out, _ = gqa_decode_attention(GroupedModule(groups), query, key, value, mask, scaling=0.3)
        short, _ = gqa_decode_attention(GroupedModule(groups), query, key[:, :, :9], value[:, :, :9], mask[..., :9],
                                        scaling=0.3)  # a shorter (sliding-window) layer is left whole
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(short, repeated_kv_attention(query, key[:, :, :9], value[:, :, :9], mask[..., :9],
                                                            0.3), atol=1e-6, rtol=1e-5)
    # Prefill: every query of the context, keys cut to the context's slots.
    query, key, value, mask = attention_inputs(heads=2 * groups, q_len=5, kv_len=11)
    mask = mask & torch.ones(5, 11, dtype=torch.bool).tril()
    with written_slots(cache_len=11) as slots:
        slots.written = 5
        out, _ = gqa_decode_attention(GroupedModule(groups), query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(out, repeated_kv_attention(query, key, value, mask, 0.3), atol=1e-6, rtol=1e-5)


def test_eager_decoding_attends_over_the_written_slots_only(tokenizer, monkeypatch):
    model = build_decoder("llama", len(tokenizer))
    contexts = varied_contexts(len(tokenizer), count=3)
    width = max(map(len, contexts))
    lengths = []
    cut = sapo.generation.decode_attention._written_part

    def recording(key, value, mask):
        key, value, mask = cut(key, value, mask)
        lengths.append(key.shape[-2])
        return key, value, mask

    monkeypatch.setattr(sapo.generation.decode_attention, "_written_part", recording)
    sampler = StaticCacheSampler(SamplingSettings(do_sample=False), pad_token_id=PAD, eos_token_ids=set())
    sampler.sample(model, contexts, 5)
    layers = model.config.num_hidden_layers
    assert lengths == [n for n in range(width, width + 5) for _ in range(layers)]  # prefill, then one slot a step


def test_a_model_the_static_engine_cannot_serve_decodes_with_generate_under_auto_and_is_refused_by_name(caplog):
    """Mamba's state-space layers are no static KV cache: its first static decode fails. Under `auto` (a generate
    fallback) the run decodes with generate and says so once; `static` asked for by name is one line."""
    from transformers import MambaConfig, MambaForCausalLM

    from sapo.errors import UsageError

    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2)).eval()
    contexts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    settings = SamplingSettings(do_sample=False)
    hf = HFGenerateSampler(settings, pad_token_id=PAD, eos_token_ids={EOS})
    auto = make_sampler("auto", settings, PAD, {EOS}, device="cpu")
    with caplog.at_level("WARNING", logger="sapo.generation"):
        assert auto.sample(mamba, contexts, 4) == hf.sample(mamba, contexts, 4)
        assert auto.sample(mamba, contexts, 4) == hf.sample(mamba, contexts, 4)
    assert auto.unsupported and caplog.text.count("static decoding cannot serve MambaForCausalLM") == 1
    static = make_sampler("static", settings, PAD, {EOS}, device="cpu")
    with pytest.raises(UsageError, match="generation_engine 'static' cannot decode MambaForCausalLM"):
        static.sample(mamba, contexts, 4)
