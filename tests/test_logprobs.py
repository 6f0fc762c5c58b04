import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from sapo.logprobs import (
    chunked_token_logps,
    hidden_state_scoring_is_exact,
    response_token_logps,
    sequence_logps,
    token_logps_from_logits,
)


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
