import math

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sapo import tiny
from sapo.buffer import ReplayEntry
from sapo.logprobs import (
    chunked_token_logps,
    final_hidden_states,
    hidden_state_scoring_is_exact,
    packed_response_token_logps,
    packing_unsupported_reason,
    response_token_logps,
    sequence_logps,
    shared_prefix_scoring_is_exact,
    token_logps_from_logits,
    token_statistics,
)
from sapo.recipes import pad_pairs


def naive_token_logps(model, input_ids, attention_mask, loss_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logps * loss_mask[:, 1:]


def batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 12), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[0, 4:] = True
    loss_mask[1, 5:9] = True
    loss_mask[2, 2:11] = True
    return ids, attention, loss_mask


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_equals_naive_values_and_gradients(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30)
    labels = torch.randint(0, 30, (13,))
    got = chunked_token_logps(hidden, labels, head, chunk_size)
    want = token_logps_from_logits(head(hidden), labels)
    torch.testing.assert_close(got, want)
    grad_got = torch.autograd.grad(got.sum(), [hidden, head.weight])
    grad_want = torch.autograd.grad(want.sum(), [hidden, head.weight])
    for g, w in zip(grad_got, grad_want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("use_hidden_states", [True, False])
def test_response_token_logps_matches_naive(tiny_model, use_hidden_states):
    ids, attention, loss_mask = batch(tiny_model.config.vocab_size)
    got = response_token_logps(tiny_model, ids, attention, loss_mask, chunk_size=4,
                               use_hidden_states=use_hidden_states)
    want = naive_token_logps(tiny_model, ids, attention, loss_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[~loss_mask[:, 1:]] == 0)


def test_sequence_logps_sum_and_mean():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    total, mean = sequence_logps(logps, mask)
    torch.testing.assert_close(total, torch.tensor([-3.0, -4.0]))
    torch.testing.assert_close(mean, torch.tensor([-1.5, -4.0]))


def test_soft_capped_model_detected_and_scored_exactly():
    config = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=1.0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    ids, attention, loss_mask = batch(40)
    assert not hidden_state_scoring_is_exact(model, ids[:1])
    got = response_token_logps(model, ids, attention, loss_mask, use_hidden_states=False)
    torch.testing.assert_close(got, naive_token_logps(model, ids, attention, loss_mask), rtol=1e-5, atol=1e-5)


def test_plain_llama_uses_hidden_state_scoring(tiny_model):
    ids, _, _ = batch(tiny_model.config.vocab_size)
    assert hidden_state_scoring_is_exact(tiny_model, ids[:1])


def test_chunked_handles_fp32_hidden_states_with_a_bf16_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30).to(torch.bfloat16)
    hidden = torch.randn(5, 8, requires_grad=True)  # what accelerate's mixed precision hands back
    labels = torch.randint(0, 30, (5,))
    got = chunked_token_logps(hidden, labels, head, chunk_size=2)
    want = token_logps_from_logits(head(hidden.to(torch.bfloat16)), labels)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_final_hidden_states_is_the_last_layer_output_without_keeping_every_layer(tiny_model):
    ids, attention, _ = batch(tiny_model.config.vocab_size)
    want = tiny_model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(final_hidden_states(tiny_model, input_ids=ids, attention_mask=attention), want)


# Shared-prefix pair scoring ------------------------------------------------------------------------------------


def pair_entries():
    """Pairs with different shared prefixes: prompt + y[:k] (k > 0), k = 0, rejected == real, an empty real suffix
    (the rejected response extends the real one), an empty rejected suffix, and rows of different lengths (right
    padding in both layouts)."""
    return [
        ReplayEntry([1, 5, 6, 7], [8, 9, 10, 11, 12], [8, 9, 20, 21], 2, 2),
        ReplayEntry([1, 5], [8, 9, 10], [30, 31, 32, 33, 34, 35], 0, 6),
        ReplayEntry([1, 5, 6], [8, 9], [8, 9], 0, 0),
        ReplayEntry([1, 5, 6, 7, 8, 9], [10, 11], [10, 11, 12, 13], 2, 2),
        ReplayEntry([1, 40], [41, 42, 43, 44], [41, 42], 2, 0),
    ]


def qwen2(vocab):
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def pair_models(tokenizer):
    llama_sdpa = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    llama_eager = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    llama_eager.set_attn_implementation("eager")
    qwen_sdpa, qwen_eager = qwen2(len(tokenizer)), qwen2(len(tokenizer))
    qwen_eager.set_attn_implementation("eager")
    return {"llama-sdpa": llama_sdpa, "llama-eager": llama_eager, "qwen2-sdpa": qwen_sdpa, "qwen2-eager": qwen_eager}


@pytest.mark.parametrize("use_hidden_states", [True, False], ids=["hidden-states", "full-logits"])
@pytest.mark.parametrize("name", ["llama-sdpa", "llama-eager", "qwen2-sdpa", "qwen2-eager"])
def test_packed_pairs_equal_separate_rows_in_values_and_gradients(tokenizer, name, use_hidden_states):
    """Full logits are what sharded engines score with (their head runs only inside their forward)."""
    model = pair_models(tokenizer)[name]
    assert model.config._attn_implementation == name.split("-")[1]
    b = pad_pairs(pair_entries(), tokenizer.pad_token_id)
    assert b["packed_input_ids"].numel() < b["input_ids"].numel()
    params = [p for p in model.parameters() if p.requires_grad]
    rows, width = b["input_ids"].shape
    weights = torch.randn(rows, width - 1, generator=torch.Generator().manual_seed(0))  # every token counts

    def scored(logps):
        return logps, torch.autograd.grad((logps * weights).sum(), params)

    want, want_grads = scored(response_token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"],
                                                   chunk_size=7, use_hidden_states=use_hidden_states))
    got, got_grads = scored(packed_response_token_logps(model, b["packed_input_ids"], b["prefix_lengths"],
                                                        b["attention_mask"], b["loss_mask"], chunk_size=7,
                                                        use_hidden_states=use_hidden_states))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.all(got[~b["loss_mask"][:, 1:]] == 0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_the_probe_accepts_packing_and_refuses_a_model_that_ignores_position_ids(tokenizer):
    b = pad_pairs(pair_entries(), tokenizer.pad_token_id)
    model = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    assert packing_unsupported_reason(model) is None
    assert shared_prefix_scoring_is_exact(model, b)

    class IgnoresPositionIds(LlamaForCausalLM):
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    ignoring = IgnoresPositionIds(model.config)
    ignoring.load_state_dict(model.state_dict())
    assert not shared_prefix_scoring_is_exact(ignoring, b)
    assert shared_prefix_scoring_is_exact(model, b, use_hidden_states=False)  # the sharded engines' probe
    assert not shared_prefix_scoring_is_exact(ignoring, b, use_hidden_states=False)


def test_packing_is_refused_where_a_custom_mask_cannot_be_exact(tokenizer):
    model = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no custom 4-D mask" in packing_unsupported_reason(model)
    config = Qwen2Config(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=1)
    assert "not all full attention" in packing_unsupported_reason(Qwen2ForCausalLM(config))


def test_token_statistics_are_trls_per_token_entropy_mean_logit_and_argmax_hit():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, float("-inf"), 1.0], [2.0, 5.0, 5.0, -1.0]],
                          requires_grad=True)
    labels = torch.tensor([1, 0, 2])
    statistics = token_statistics(logits, labels)
    assert not statistics.requires_grad  # logged only: no graph kept
    expected_entropy = torch.distributions.Categorical(logits=logits.detach()).entropy()
    torch.testing.assert_close(statistics[:, 0], expected_entropy)  # a -inf logit adds 0, not NaN
    assert statistics[0, 0].item() == pytest.approx(math.log(4))
    assert statistics[:2, 1].tolist() == [0.0, float("-inf")] and statistics[2, 1].item() == pytest.approx(2.75)
    # the argmax is the first most likely token, as torch.argmax and TRL's fused head take it
    assert statistics[:, 2].tolist() == [0.0, 1.0, 0.0]  # the last: label 2 ties with 1, which comes first
