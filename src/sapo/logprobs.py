"""Per-token log-probabilities of response tokens, without materialising full-batch fp32 logits.

A preference batch is 2 x batch sequences; at a 128k vocabulary and 2k tokens the fp32 logits of one
sequence alone are 1 GiB. The model is therefore run for its final hidden states only
(`logits_to_keep=1`), and the vocabulary projection + log-softmax is applied to the response positions
in chunks, each chunk recomputed in the backward pass (activation checkpointing), so peak memory holds
one chunk's logits instead of the whole batch's. Models whose logits are not a plain projection of the
last hidden state (soft-capping, scaling) are detected once and scored through ordinary logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def shifted_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t is predicted from position t-1: labels and their mask, both of shape (batch, seq-1)."""
    return input_ids[:, 1:], loss_mask[:, 1:].bool()


def token_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in fp32; `logits` (..., vocab), `labels` (...)."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _project_chunk(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    # Under mixed precision accelerate returns fp32 hidden states while the head stays bf16; the
    # projection runs outside autocast here, so match the head's dtype explicitly.
    return token_logps_from_logits(F.linear(hidden.to(weight.dtype), weight, bias), labels)


def chunked_token_logps(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_size: int
) -> torch.Tensor:
    """Log-probs of `labels` (N,) given final hidden states (N, d), `chunk_size` rows at a time.

    Under autograd each chunk is checkpointed, so its (chunk, vocab) logits are freed after the
    forward and recomputed in the backward instead of being kept for the whole batch.
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    pieces = []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if needs_grad:
            pieces.append(checkpoint(_project_chunk, h, y, weight, bias, use_reentrant=False))
        else:
            pieces.append(_project_chunk(h, y, weight, bias))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def output_projection(model: nn.Module) -> nn.Module:
    """The vocabulary projection (lm_head) of a causal LM, through peft/DDP wrappers."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(inner).__name__} has no output embedding (lm_head) to score tokens with")
    return head


def response_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    use_hidden_states: bool = True,
) -> torch.Tensor:
    """Per-token log-probs (batch, seq-1), zero outside the response tokens given by `loss_mask`."""
    labels, mask = shifted_targets(input_ids, loss_mask)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=input_ids.device)
    if use_hidden_states:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        logits_to_keep=1, use_cache=False)
        hidden = outputs.hidden_states[-1][:, :-1][mask]
        picked = chunked_token_logps(hidden, labels[mask], output_projection(model), chunk_size)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        picked = token_logps_from_logits(logits[:, :-1][mask], labels[mask])
    return out.masked_scatter(mask, picked)


def hidden_state_scoring_is_exact(model: nn.Module, probe_ids: Any, atol: float = 1e-3) -> bool:
    """Whether lm_head(last hidden state) reproduces the model's logits (false for soft-capped models)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(input_ids=probe_ids, output_hidden_states=True, use_cache=False)
            projected = output_projection(model)(outputs.hidden_states[-1])
            return bool(torch.allclose(projected.float(), outputs.logits.float(), atol=atol, rtol=1e-3))
    finally:
        model.train(was_training)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean log-prob per sequence over masked tokens (mask aligned with `token_logps`)."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total, total / mask.sum(-1).clamp(min=1)
