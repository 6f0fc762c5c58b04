"""Per-token log-probabilities of response tokens, without materialising full-batch fp32 logits.

A preference batch is 2 x batch sequences; at a 128k vocabulary and 2k tokens the fp32 logits of one
sequence alone are 1 GiB. The model is therefore run for its final hidden states only
(`logits_to_keep=1`), and the vocabulary projection + log-softmax is applied to the response positions
in chunks, each chunk recomputed in the backward pass (activation checkpointing), so peak memory holds
one chunk's logits instead of the whole batch's. Models whose logits are not a plain projection of the
last hidden state (soft-capping, scaling) are detected once and scored through ordinary logits.

The policy's scoring also returns TRL's per-token statistics (`TOKEN_STATISTICS`: entropy, mean logit, whether the
label is the argmax) for its logged metrics. They are computed without gradient from each chunk's logits while
they exist anyway (no second projection, no logits kept), so they cost one transient chunk of probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from sapo.packing import PackedLayout, limited_attention, packed_layout
from sapo.pair_attention import FLEX_ATTENTIONS, PAIR_ATTENTION, flex_runs_here, pair_block_mask


def shifted_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t is predicted from position t-1: labels and their mask, both of shape (batch, seq-1)."""
    return input_ids[:, 1:], loss_mask[:, 1:].bool()


def token_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in fp32; `logits` (..., vocab), `labels` (...)."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


TOKEN_STATISTICS = ("entropy", "mean_logit", "top1")
"""Per-token columns of `token_statistics`, as TRL's fused head computes them: the entropy of the next-token
distribution, the mean of its logits over the vocabulary, and 1.0 where the label is the most likely token."""


def token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`TOKEN_STATISTICS` of each row of `logits` (N, vocab) given its label (N,), as an (N, 3) fp32 tensor without
    gradient. The probabilities are one transient (N, vocab) tensor, freed on return; `xlogy` makes a token of
    probability 0 contribute 0 to the entropy (not 0 * -inf = NaN)."""
    with torch.no_grad():
        z = logits.detach().float()
        probs = (z - torch.logsumexp(z, dim=-1, keepdim=True)).exp_()
        entropy = -probs.xlogy_(probs).sum(-1)
        del probs
        return torch.stack([entropy, z.mean(-1), (z.argmax(-1) == labels).float()], dim=-1)


def _project_chunk(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, with_statistics: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # Under mixed precision accelerate returns fp32 hidden states while the head stays bf16; the
    # projection runs outside autocast here, so match the head's dtype explicitly.
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    logps = token_logps_from_logits(logits, labels)
    # After the log-probs: a checkpoint's recompute stops once it has what the backward needs, before this.
    return (logps, token_statistics(logits, labels)) if with_statistics else logps


def chunked_token_scores(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_size: int, *,
    with_statistics: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of `labels` (N,) given final hidden states (N, d), `chunk_size` rows at a time, and with
    `with_statistics` their `token_statistics` (N, 3) from the same chunk logits (else None).

    Under autograd each chunk is checkpointed, so its (chunk, vocab) logits are freed after the
    forward and recomputed in the backward instead of being kept for the whole batch.
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    pieces, statistics = [], []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if needs_grad:
            scored = checkpoint(_project_chunk, h, y, weight, bias, with_statistics, use_reentrant=False)
        else:
            scored = _project_chunk(h, y, weight, bias, with_statistics)
        if with_statistics:
            scored, chunk_statistics = scored
            statistics.append(chunk_statistics)
        pieces.append(scored)
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (hidden.new_zeros(0, len(TOKEN_STATISTICS), dtype=torch.float32) if with_statistics else None)
    return torch.cat(pieces), (torch.cat(statistics) if with_statistics else None)


def chunked_token_logps(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_size: int
) -> torch.Tensor:
    """`chunked_token_scores` without the statistics."""
    return chunked_token_scores(hidden, labels, lm_head, chunk_size)[0]


def _statistics_of_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`token_statistics` of logits that exist already (the full-logits path), `chunk_size` rows at a time so the
    probabilities are one chunk's."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, len(TOKEN_STATISTICS), dtype=torch.float32)
    return torch.cat([token_statistics(logits[start:start + chunk_size], labels[start:start + chunk_size])
                      for start in range(0, logits.shape[0], chunk_size)])


def output_projection(model: nn.Module) -> nn.Module:
    """The vocabulary projection (lm_head) of a causal LM, through peft/DDP wrappers."""
    inner = inner_model(model)
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(inner).__name__} has no output embedding (lm_head) to score tokens with")
    return head


def inner_model(model: nn.Module) -> nn.Module:
    """The causal LM inside DDP/DeepSpeed/accelerate wrappers (a peft wrapper is kept: it forwards attribute
    lookups). A wrapper is anything with a `.module` that is not itself a transformers model: DeepSpeed's engine
    forwards `get_output_embeddings` to its module, but its own `config` is DeepSpeed's, not the model's."""
    inner = model
    while not isinstance(inner, PreTrainedModel) and hasattr(inner, "module"):
        inner = inner.module
    return inner


def final_hidden_states(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """The decoder's last hidden state (the lm_head's input) for `inputs`, from a forward through `model` itself
    (so DDP/FSDP wrappers see it) that keeps one logit row and no per-layer hidden states: a forward hook on the
    decoder catches its output, where `output_hidden_states=True` would return (and the reference's no-grad
    forward would hold) every layer's."""
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0])

    handle = inner_model(model).get_decoder().register_forward_hook(keep)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(inner_model(model)).__name__}: its decoder did not run in the forward")
    return captured[-1]


def response_token_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    use_hidden_states: bool = True,
    with_statistics: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (batch, seq-1), zero outside the response tokens given by `loss_mask`, and with
    `with_statistics` their `token_statistics` (batch, seq-1, 3), zero there too (else None)."""
    labels, mask = shifted_targets(input_ids, loss_mask)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=input_ids.device)
    if use_hidden_states:
        hidden = final_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)[:, :-1][mask]
        picked, statistics = chunked_token_scores(hidden, labels[mask], output_projection(model), chunk_size,
                                                  with_statistics=with_statistics)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        selected = logits[:, :-1][mask]
        picked = token_logps_from_logits(selected, labels[mask])
        statistics = _statistics_of_logits(selected, labels[mask], chunk_size) if with_statistics else None
        del selected, logits
    return out.masked_scatter(mask, picked), _scattered_statistics(statistics, mask)


def _scattered_statistics(statistics: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """Per-token statistics of the masked positions (N, 3) laid out as (batch, seq-1, 3), zero elsewhere."""
    if statistics is None:
        return None
    out = torch.zeros((*mask.shape, len(TOKEN_STATISTICS)), dtype=torch.float32, device=mask.device)
    out[mask] = statistics
    return out


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
    return response_token_scores(model, input_ids, attention_mask, loss_mask, chunk_size=chunk_size,
                                 use_hidden_states=use_hidden_states)[0]


PACKABLE_ATTENTION = ("sdpa", "eager", *FLEX_ATTENTIONS)
"""Attention implementations that take a packed row's mask as given (transformers' masking_utils returns a 4-D mask
or a BlockMask as-is): sdpa a boolean mask, eager an additive float mask, FlexAttention a BlockMask
(`sapo.pair_attention`). Flash-attention takes none."""


def packing_unsupported_reason(model: nn.Module) -> str | None:
    """Why shared-prefix packing cannot be exact for this model (None when it can): the attention implementation
    cannot take a custom mask, or some attention is not full-causal (`sapo.packing.limited_attention`: a custom
    mask replaces sliding windows, chunks and ALiBi)."""
    config = getattr(inner_model(model), "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKABLE_ATTENTION:
        return f"attention implementation {implementation!r} takes no custom 4-D mask"
    return limited_attention(config)


def _attention_mask_for(model: nn.Module, layout: PackedLayout) -> Any:
    """The packed rows' mask in the form the model's attention implementation takes: a BlockMask for FlexAttention
    where it runs (`sapo.pair_attention`), a boolean mask for SDPA, an additive float mask for eager attention."""
    inner = inner_model(model)
    implementation = inner.config._attn_implementation
    device = layout.prefix.device
    if implementation == "flex_attention" or (implementation == PAIR_ATTENTION and flex_runs_here(device)):
        return pair_block_mask(layout.prefix, layout.real_end, layout.end, layout.width)
    allowed = layout.dense_mask()
    if implementation in ("sdpa", PAIR_ATTENTION):
        return allowed
    dtype = inner.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                      torch.finfo(dtype).min)


def packed_response_token_logps(
    model: nn.Module,
    packed_input_ids: torch.Tensor,
    prefix_lengths: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    use_hidden_states: bool = True,
) -> torch.Tensor:
    """`packed_response_token_scores` without the statistics."""
    return packed_response_token_scores(model, packed_input_ids, prefix_lengths, attention_mask, loss_mask,
                                        chunk_size=chunk_size, use_hidden_states=use_hidden_states)[0]


def packed_response_token_scores(
    model: nn.Module,
    packed_input_ids: torch.Tensor,
    prefix_lengths: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    use_hidden_states: bool = True,
    with_statistics: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`response_token_logps` of a batch of pairs (real rows, then rejected rows; `attention_mask`, `loss_mask`
    (2B, W)), computed from one packed row per pair (see `sapo.packing`): the shared prefix runs once, and each
    packed token's log-prob is projected once and scattered to every row that holds it. Without hidden states
    (sharded engines, whose head only runs inside their forward), the packed rows' ordinary logits are read: still
    one logit row per packed token, fewer than the two separate rows would produce. With `with_statistics`, the
    `token_statistics` of the same tokens (2B, W-1, 3), as `response_token_scores` gives them (else None)."""
    pairs, width = packed_input_ids.shape
    layout = packed_layout(width, prefix_lengths, attention_mask, loss_mask)
    inputs = {"input_ids": packed_input_ids, "position_ids": layout.position_ids,
              "attention_mask": _attention_mask_for(model, layout)}
    rows = torch.arange(pairs, device=packed_input_ids.device)[:, None] * width
    picked_rows = (rows + layout.predecessors)[layout.targets]
    labels = packed_input_ids[layout.targets]
    if use_hidden_states:
        hidden = final_hidden_states(model, **inputs)
        picked, statistics = chunked_token_scores(hidden.flatten(0, 1)[picked_rows], labels,
                                                  output_projection(model), chunk_size,
                                                  with_statistics=with_statistics)
    else:
        logits = model(**inputs, use_cache=False).logits
        selected = logits.flatten(0, 1)[picked_rows]
        picked = token_logps_from_logits(selected, labels)
        statistics = _statistics_of_logits(selected, labels, chunk_size) if with_statistics else None
        del selected, logits
    packed = torch.zeros(layout.targets.shape, dtype=torch.float32, device=packed_input_ids.device)
    packed = packed.masked_scatter(layout.targets, picked)
    gathered = torch.cat([packed, packed]).gather(1, layout.source)
    response = loss_mask[:, 1:].bool()
    logps = torch.where(response, gathered, torch.zeros_like(gathered))
    if statistics is None:
        return logps, None
    packed_statistics = _scattered_statistics(statistics, layout.targets)
    source = layout.source.unsqueeze(-1).expand(-1, -1, len(TOKEN_STATISTICS))
    unpacked = torch.cat([packed_statistics, packed_statistics]).gather(1, source)
    return logps, unpacked * response.unsqueeze(-1)


def hidden_state_scoring_is_exact(model: nn.Module, probe_ids: Any, atol: float = 1e-3) -> bool:
    """Whether lm_head(last hidden state) reproduces the model's logits (false for soft-capped models)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = final_hidden_states(model, input_ids=probe_ids)
            logits = model(input_ids=probe_ids, use_cache=False).logits
            projected = output_projection(model)(hidden)
            return bool(torch.allclose(projected.float(), logits.float(), atol=atol, rtol=1e-3))
    finally:
        model.train(was_training)


def shared_prefix_scoring_is_exact(model: nn.Module, batch: dict[str, torch.Tensor], *, use_hidden_states: bool = True,
                                   half_precision: bool = False) -> bool:
    """Whether packed pair rows give the unshared rows' log-probs on `batch` (a `pad_pairs` batch): false where
    the model ignores a custom mask or position ids. The tolerance follows the precision the model computes in
    (`half_precision`, or half-precision weights): half-precision kernels round the two layouts differently, and a
    mask that is not honoured moves log-probs by far more."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            separate = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                            use_hidden_states=use_hidden_states)
            packed = packed_response_token_logps(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                                 batch["attention_mask"], batch["loss_mask"],
                                                 use_hidden_states=use_hidden_states)
    finally:
        model.train(was_training)
    half = half_precision or output_projection(model).weight.dtype in (torch.float16, torch.bfloat16)
    # In full precision exact packing differs by float rounding (~1e-6); a relative term would let a log-prob of
    # -5 move by 5e-4, about what ignoring position ids moves it in a freshly initialised model.
    return bool(torch.allclose(packed, separate, atol=3e-2 if half else 1e-4, rtol=1e-2 if half else 0.0))


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean log-prob per sequence over masked tokens (mask aligned with `token_logps`)."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total, total / mask.sum(-1).clamp(min=1)
