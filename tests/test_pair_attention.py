"""FlexAttention for packed pairs: one mask rule, a dispatcher that changes nothing but packed rows, the choice.

The CPU tests check the block mask and the uncompiled FlexAttention forward (torch has no CPU backward: gradients
there take the dense mask, also checked); the `cuda` tests (run by benchmarks/gpu_check.sh) check the compiled
kernels' log-probs and gradients against separate rows, and that a new packed width does not recompile forever.
"""

import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from sapo import pair_attention
from sapo.batching import pad_pair_sequences
from sapo.config import SAPOConfig
from sapo.logprobs import _attention_mask_for, packed_response_token_logps, response_token_logps
from sapo.packing import packed_layout, pair_attention_mask
from sapo.pair_attention import (
    PAIR_ATTENTION,
    attend_pairs_densely,
    attend_pairs_with_flex,
    dense_mask_of,
    flex_refusal,
    flex_wanted,
    pair_attention_forward,
    pair_block_mask,
)
from sapo.tiny import build_tokenizer
from sapo.trainer import SAPOTrainer

pytestmark = pytest.mark.skipif(not pair_attention.flex_available(), reason="this torch has no FlexAttention")


def random_bounds(generator: random.Random, pairs: int, width: int) -> tuple[torch.Tensor, ...]:
    """Packed rows' (prefix, real_end, end) with 1 <= prefix <= real_end <= end <= width (padding after end)."""
    rows = []
    for _ in range(pairs):
        end = generator.randint(2, width)
        real_end = generator.randint(1, end)
        rows.append((generator.randint(1, real_end), real_end, end))
    return tuple(torch.tensor(column) for column in zip(*rows, strict=True))


@pytest.mark.parametrize("width", [7, 64, 130, 300])
def test_the_block_mask_is_the_dense_mask(width):
    generator = random.Random(width)
    for _ in range(5):
        prefix, real_end, end = random_bounds(generator, 3, width)
        dense = pair_attention_mask(prefix, real_end, end, width)
        assert torch.equal(dense_mask_of(pair_block_mask(prefix, real_end, end, width)), dense)


def test_the_block_mask_skips_the_blocks_no_query_attends():
    """A 512-token row: prefix 128, real suffix to 384, rejected suffix to 512. The rejected queries (block 3) skip
    the real suffix's blocks (1, 2), and no query block reads a block after it: 6 of 16 blocks are computed less
    the skipped ones, where the dense mask's kernel computes all 16."""
    block_mask = pair_block_mask(torch.tensor([128]), torch.tensor([384]), torch.tensor([512]), 512)
    blocks = block_mask.to_dense()[0, 0].int()  # (query block, key block): 1 where any pair is allowed
    assert blocks.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]


def tiny_model(config_class=Qwen2Config, **overrides):
    """Three query heads per KV head (not a power of two, as Qwen2-0.5B's seven)."""
    torch.manual_seed(0)
    settings = {"vocab_size": 100, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 6, "num_key_value_heads": 2, "attn_implementation": "sdpa", **overrides}
    return AutoModelForCausalLM.from_config(config_class(**settings)).eval()


def pairs_batch() -> dict[str, torch.Tensor]:
    ids = [(11 * i + 5) % 93 + 7 for i in range(90)]
    return pad_pair_sequences([(ids[:12], ids[12:40], ids[12:22] + ids[50:66]), (ids[:6], ids[40:70], ids[66:80]),
                               (ids[:3], ids[70:75], ids[70:75])], pad_token_id=0)


def packed(model, batch):
    return packed_response_token_logps(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                       batch["attention_mask"], batch["loss_mask"])


def separate(model, batch):
    return response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])


class FlexCalls:
    """Counts FlexAttention calls through the dispatcher, with their inputs' dtypes (the real function runs)."""

    def __init__(self, monkeypatch):
        self.count, self.dtypes, real = 0, set(), pair_attention.flex_attention

        def counted(*args, **kwargs):
            self.count += 1
            self.dtypes.add(tuple(tensor.dtype for tensor in args[:3]))
            return real(*args, **kwargs)

        monkeypatch.setattr(pair_attention, "flex_attention", counted)


@pytest.mark.parametrize("config_class", [Qwen2Config, LlamaConfig])
def test_flex_packed_rows_score_as_separate_rows(config_class, monkeypatch):
    model, batch = tiny_model(config_class), pairs_batch()
    with torch.no_grad():
        expected = separate(model, batch)
        assert attend_pairs_with_flex(model) is None and model.config._attn_implementation == PAIR_ATTENTION
        calls = FlexCalls(monkeypatch)
        got = packed(model, batch)
        assert calls.count == model.config.num_hidden_layers  # every layer attended through FlexAttention
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # unpacked rows never meet a BlockMask: the dispatcher is SDPA for them, to the bit
        assert torch.equal(separate(model, batch), expected)
        assert calls.count == model.config.num_hidden_layers


def test_under_autocast_flex_gets_the_dtype_sdpa_gets(monkeypatch):
    """bf16 autocast casts SDPA's inputs but not FlexAttention's, and rotary embeddings leave query and key in fp32
    beside a bf16 value: the dispatcher casts all three to the autocast dtype (compiled kernels refuse mixed ones)."""
    model, batch = tiny_model(LlamaConfig), pairs_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense = packed(model, batch)
        attend_pairs_with_flex(model)
        calls = FlexCalls(monkeypatch)
        flex = packed(model, batch)
    assert calls.dtypes == {(torch.bfloat16,) * 3}
    torch.testing.assert_close(flex, dense, atol=2e-3, rtol=0)


def test_gradients_on_a_cpu_take_the_dense_mask_and_equal_separate_rows(monkeypatch):
    model, batch = tiny_model(), pairs_batch()
    weights = None
    grads = {}
    for name, score in (("separate", separate), ("packed", packed)):
        if name == "packed":
            attend_pairs_with_flex(model)
            calls = FlexCalls(monkeypatch)
        model.zero_grad()
        logps = score(model, batch)
        weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps) if weights is None else weights
        (logps * weights).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert calls.count == 0  # no FlexAttention backward on a CPU
    for name, grad in grads["separate"].items():
        torch.testing.assert_close(grads["packed"][name], grad, atol=1e-5, rtol=1e-5)


def test_the_mask_follows_the_implementation_and_the_grad_mode():
    model, batch = tiny_model(), pairs_batch()
    layout = packed_layout(batch["packed_input_ids"].shape[1], batch["prefix_lengths"], batch["attention_mask"],
                           batch["loss_mask"])
    assert _attention_mask_for(model, layout).dtype == torch.bool  # sdpa: the dense mask
    attend_pairs_with_flex(model)
    with torch.no_grad():
        assert isinstance(_attention_mask_for(model, layout), pair_attention.BlockMask)
    assert _attention_mask_for(model, layout).dtype == torch.bool  # gradients on a CPU
    attend_pairs_densely(model)
    assert model.config._attn_implementation == "sdpa"


def test_the_dispatcher_runs_what_flex_cannot_through_the_same_dense_mask(monkeypatch):
    """Attention dropout, soft-capping, biases: SDPA with the block mask's own rule, not FlexAttention."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    prefix, real_end, end = torch.tensor([5, 10]), torch.tensor([20, 30]), torch.tensor([33, 40])
    block_mask = pair_block_mask(prefix, real_end, end, 40)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    calls = FlexCalls(monkeypatch)
    with torch.no_grad():
        flex, _ = pair_attention_forward(module, query, key, value, block_mask)
        assert calls.count == 1
        torch.manual_seed(1)
        dropped, _ = pair_attention_forward(module, query, key, value, block_mask, dropout=0.5)
        assert calls.count == 1
    dense = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
        attn_mask=pair_attention_mask(prefix, real_end, end, 40)).transpose(1, 2)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)
    assert not torch.allclose(dropped, dense)  # dropout was applied, by SDPA


def test_models_that_cannot_take_flex_say_why():
    assert "not sdpa" in flex_refusal(tiny_model(attn_implementation="eager"))
    assert flex_refusal(tiny_model()) is None


def test_auto_means_cuda_and_names_are_checked():
    assert flex_wanted("auto", torch.device("cuda")) and not flex_wanted("auto", torch.device("cpu"))
    assert flex_wanted("flex", torch.device("cpu")) and not flex_wanted("dense", torch.device("cuda"))
    with pytest.raises(ValueError, match="pair_attention"):
        flex_wanted("sparse", torch.device("cpu"))


def trainer_for(tmp_path, setting: str, model=None) -> SAPOTrainer:
    tokenizer = build_tokenizer()
    model = model or tiny_model(LlamaConfig, vocab_size=len(tokenizer))
    records = [{"messages": [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": word * 3}]}
               for word in ("abc", "de", "fgh", "ij")]
    args = SAPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, max_steps=1,
                      token_generate_length=4, max_length=48, max_prompt_length=32, report_to="none",
                      save_strategy="no", pair_attention=setting)
    return SAPOTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer)


@pytest.mark.parametrize(("setting", "layout"), [
    ("auto", "packed pairs, dense mask"), ("dense", "packed pairs, dense mask"),
    ("flex", "packed pairs, FlexAttention without gradients, dense mask with them")])
def test_the_trainer_chooses_the_pair_attention(tmp_path, setting, layout, caplog):
    with caplog.at_level(logging.INFO, logger="sapo"):
        trainer = trainer_for(tmp_path, setting)
    assert trainer.scoring.layout == layout
    assert f"pair scoring: {layout}" in caplog.text
    switched = trainer.copies.policy.config._attn_implementation == PAIR_ATTENTION
    assert switched == (setting == "flex")
    trainer.train()  # a step packs, and the reference's no-grad forward takes the block mask where switched


def test_a_model_flex_cannot_serve_is_packed_with_the_dense_mask(tmp_path, caplog):
    tokenizer = build_tokenizer()
    model = tiny_model(LlamaConfig, vocab_size=len(tokenizer), attn_implementation="eager")
    with caplog.at_level(logging.INFO, logger="sapo"):
        trainer = trainer_for(tmp_path, "flex", model)
    assert trainer.scoring.layout == "packed pairs, dense mask"
    assert "pair_attention flex: attention implementation 'eager' is not sdpa" in caplog.text


def test_a_switched_model_still_decodes_with_the_gqa_step():
    """Generation replaces the dispatcher like SDPA (it is SDPA for every mask a decode step builds), then puts it
    back."""
    from sapo.generation.decode_attention import DECODE_ATTENTION, decode_attention

    model = tiny_model()
    attend_pairs_with_flex(model)
    with decode_attention(model) as replaced:
        assert replaced and model.config._attn_implementation == DECODE_ATTENTION
    assert model.config._attn_implementation == PAIR_ATTENTION


def test_a_model_whose_pairs_are_not_packed_is_not_switched(tmp_path):
    """Sliding windows: separate rows, so the flex switch is undone."""
    tokenizer = build_tokenizer()
    model = tiny_model(Qwen2Config, vocab_size=len(tokenizer), use_sliding_window=True, sliding_window=8,
                       max_window_layers=0)
    trainer = trainer_for(tmp_path, "flex", model)
    assert trainer.scoring.layout == "separate rows"
    assert trainer.copies.policy.config._attn_implementation == "sdpa"



# -- on CUDA: the compiled kernels ------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_model():
    """Qwen2-0.5B's attention shape (14 heads, 2 KV heads, head dim 64) in two small layers, fp32 weights."""
    return tiny_model(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=256).cuda()


def scores_and_gradients(model, batch, score):
    model.zero_grad()
    logps = score(model, batch)
    (logps * torch.linspace(0.5, 1.5, logps.numel(), device=logps.device).view_as(logps)).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@cuda
def test_cuda_flex_matches_separate_rows_and_compiles_once_for_new_shapes():
    """Compiled FlexAttention's packed log-probs and gradients equal separate rows' at five packed widths and four
    batch sizes (a width differs at almost every batch): after one recompile (to dynamic shapes) none follow, and
    the compiled FlexAttention has no graph break."""
    from torch._dynamo.utils import counters

    model = cuda_model()
    attend_pairs_with_flex(model)  # separate rows never meet a BlockMask: SDPA, as before
    ids = [(7 * i + 3) % 93 + 7 for i in range(400)]
    compiles: list[str] = []
    torch._dynamo.callback_handler.register_end_callback(
        lambda args: compiles.append(str(args.compile_id)) if "DYNAMO" in str(args.callback_trigger) else None)
    breaks = sum(counters["graph_break"].values())
    for pairs, length in ((2, 40), (3, 90), (2, 150), (4, 230), (1, 310)):
        rows = [(ids[:8 + p], ids[8 + p:length], ids[8 + p:12 + p] + ids[length:length + 30]) for p in range(pairs)]
        batch = {name: tensor.cuda() for name, tensor in pad_pair_sequences(rows, 0).items()}
        expected, expected_grads = scores_and_gradients(model, batch, separate)
        got, grads = scores_and_gradients(model, batch, packed)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    recompiles = [cid for cid in compiles if not cid.rstrip("]").endswith("/0")]
    assert compiles and len(recompiles) <= 2, compiles
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


@cuda
def test_cuda_flex_under_bf16_autocast_scores_and_trains():
    """Mixed precision as `--bf16` runs it: fp32 weights, bf16 autocast."""
    model, batch = cuda_model(), {name: tensor.cuda() for name, tensor in pairs_batch().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = separate(model, batch).detach()
        attend_pairs_with_flex(model)
        logps = packed(model, batch)
    logps.sum().backward()
    torch.testing.assert_close(logps.detach(), expected, atol=3e-2, rtol=1e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_backward_that_fails_through_packed_rows_is_an_answer_not_a_crash():
    """FlexAttention's backward kernel compiles at the first training step; on a GPU the trainer runs one backward
    through the probe's packed rows at the start (`flex_backward_failure`), so that a kernel that cannot compile is
    replaced by the dense mask there. Here a backward that raises stands for such a kernel; the probe's gradients
    are cleared either way."""
    from sapo.scoring import flex_backward_failure

    model = tiny_model()
    assert flex_backward_failure(model, 0, use_hidden_states=True) is None
    assert all(p.grad is None for p in model.parameters())

    def fail(module, grad_input, grad_output):
        raise RuntimeError("triton: out of resources\nmore detail")

    model.model.layers[0].self_attn.register_full_backward_hook(fail)
    reason = flex_backward_failure(model, 0, use_hidden_states=True)
    assert reason == "a backward through packed rows fails (RuntimeError: triton: out of resources)"
    assert all(p.grad is None for p in model.parameters())
    frozen = tiny_model().requires_grad_(False)
    assert flex_backward_failure(frozen, 0, use_hidden_states=True) is None  # a reference: no backward to check


@cuda
def test_cuda_the_trainer_attends_packed_pairs_through_flex_by_default(tmp_path):
    tokenizer = build_tokenizer()
    model = tiny_model(LlamaConfig, vocab_size=len(tokenizer), hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2)
    args = SAPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, token_generate_length=4,
                      max_length=48, max_prompt_length=32, report_to="none", save_strategy="no", bf16=True)
    records = [{"messages": [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": word * 3}]}
               for word in ("abc", "de", "fgh", "ij")]
    trainer = SAPOTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer)
    assert trainer.scoring.layout == "packed pairs, FlexAttention"
    trainer.train()
