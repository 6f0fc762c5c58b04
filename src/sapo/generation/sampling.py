"""What `generate` takes from a model's `generation_config` beyond `SamplingSettings` (`checkpoint_sampling`),
and the on-device sampling the static engine uses (penalties, top-k/top-p/min-p filters, the categorical draw)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from sapo.generation.protocol import SamplingSettings
from sapo.generation.topk_sampling import top_k_draw, top_k_set

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The model's generation_config: what `generate` adds to SamplingSettings
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSampling:
    """Sampling fields of the model's `generation_config` that both engines apply.

    `HFGenerateSampler` passes only SAPO's own fields to `generate` (`SamplingSettings`, lengths, special
    tokens, one greedy-or-sampled row per context); `generate` fills every field left unset from the
    model's `generation_config`, so a checkpoint's `repetition_penalty` or `min_p` reach its sampling. The
    static engine reads the same two fields so that both engines draw from the same distribution.
    """

    repetition_penalty: float = 1.0
    min_p: float | None = None


def _given(value: Any) -> bool:
    return value is not None


def _non_empty(value: Any) -> bool:
    return value is not None and len(value) > 0


def _positive(value: Any) -> bool:
    return value is not None and value > 0


def _not_one(value: Any) -> bool:
    return value is not None and value != 1


def _cutoff(value: Any) -> bool:
    return value is not None and 0 < value < 1


# Fields `generate` acts on in every mode (logits processors, stopping criteria, other decoding methods).
_REFUSED_ALWAYS: dict[str, Callable[[Any], bool]] = {
    "sequence_bias": _non_empty, "bad_words_ids": _non_empty, "no_repeat_ngram_size": _positive,
    "encoder_repetition_penalty": _not_one, "encoder_no_repeat_ngram_size": _positive,
    "forced_bos_token_id": _given, "forced_eos_token_id": _given, "remove_invalid_values": bool,
    "exponential_decay_length_penalty": _given, "suppress_tokens": _non_empty,
    "begin_suppress_tokens": _non_empty, "guidance_scale": _not_one, "watermarking_config": _given,
    "token_healing": bool, "max_time": _given, "stop_strings": _non_empty, "constraints": _given,
    "force_words_ids": _given, "dola_layers": _given, "prompt_lookup_num_tokens": _given,
    "assistant_early_exit": _given, "use_mtp": bool,
}
# Fields `generate` acts on only when sampling (warpers) or only when greedy (contrastive search).
_REFUSED_SAMPLING: dict[str, Callable[[Any], bool]] = {
    "top_h": _given, "typical_p": lambda value: value is not None and value < 1, "epsilon_cutoff": _cutoff,
    "eta_cutoff": _cutoff,
}
_REFUSED_GREEDY: dict[str, Callable[[Any], bool]] = {"penalty_alpha": _positive}


def checkpoint_sampling(generation_config: GenerationConfig | None, do_sample: bool) -> CheckpointSampling:
    """The fields of `generation_config` the static engine applies; a ValueError for any it cannot.

    Applied: `repetition_penalty` (greedy and sampling) and `min_p` (sampling only, as in `generate`).
    Ignored because SAPO sets them itself for both engines: do_sample, temperature, top_k, top_p, lengths,
    special tokens, num_beams, num_return_sequences; also `renormalize_logits` (a log-softmax changes
    neither the sampled distribution nor the argmax). Anything else `generate` would apply is refused, so
    that the two engines never quietly decode different things.
    """
    if generation_config is None:
        return CheckpointSampling()
    refused = {**_REFUSED_ALWAYS, **(_REFUSED_SAMPLING if do_sample else _REFUSED_GREEDY)}
    found = {name: getattr(generation_config, name, None) for name in refused}
    found = {name: value for name, value in found.items() if refused[name](value)}
    if found:
        fields = ", ".join(f"{name}={value!r}" for name, value in found.items())
        raise ValueError(
            f"the model's generation_config sets {fields}, which model.generate applies but the static "
            "generation engine does not implement; use `generation_engine: hf`, or unset "
            f"{'it' if len(found) == 1 else 'them'} in generation_config.json")
    return CheckpointSampling(repetition_penalty=_config_repetition_penalty(generation_config),
                              min_p=_config_min_p(generation_config) if do_sample else None)


def _config_repetition_penalty(generation_config: GenerationConfig) -> float:
    penalty = getattr(generation_config, "repetition_penalty", None)
    if penalty is None:
        return 1.0
    if not penalty > 0:
        raise ValueError(f"generation_config.repetition_penalty must be > 0, got {penalty!r}")
    return float(penalty)


def _config_min_p(generation_config: GenerationConfig) -> float | None:
    min_p = getattr(generation_config, "min_p", None)
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"generation_config.min_p must lie in [0, 1], got {min_p!r}")
    return None if min_p is None else float(min_p)


# ------------------------------------------------------------------------------------------------
# On-device sampling
# ------------------------------------------------------------------------------------------------


def seen_token_mask(ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(batch, vocab) True where a token occurs in the (left-padded) context: what the repetition penalty
    of `generate` looks at (it skips the left padding too). Ids beyond the logits' width cannot be
    generated and are ignored, as in transformers."""
    spare = vocab_size  # one extra column collects pads and out-of-range ids, then is dropped
    targets = ids.clamp(max=spare).masked_fill(attention_mask == 0, spare)
    seen = torch.zeros((ids.shape[0], vocab_size + 1), dtype=torch.bool, device=ids.device)
    return seen.scatter_(-1, targets, True)[:, :vocab_size]


def mark_seen(seen: torch.Tensor | None, token: torch.Tensor) -> torch.Tensor | None:
    """`seen` with each row's new token added (out of place, so it can flow through a compiled step)."""
    if seen is None:
        return None
    return seen.scatter(-1, token.unsqueeze(-1), True)


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """`RepetitionPenaltyLogitsProcessor`'s rule: seen tokens' logits are divided by the penalty when
    positive and multiplied by it when negative, so a penalty > 1 always makes them less likely."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keeps every logit >= the k-th largest, ties included (`TopKLogitsWarper`); bf16 logits tie often."""
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`TopPLogitsWarper` over the whole vocabulary: sorted ascending, tokens whose cumulative probability
    is <= 1 - top_p go, the most likely one always stays. Ties are ordered by token id (a stable sort):
    transformers' unstable sort breaks them arbitrarily, so only the number kept is defined there."""
    ascending, order = torch.sort(logits, dim=-1, stable=True)
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove[..., -1] = False
    return logits.masked_fill(torch.zeros_like(remove).scatter_(-1, order, remove), float("-inf"))


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k (ties kept) then top-p, as the two warpers of `generate`, without sorting the vocabulary.

    The top-k set is the `top_k` largest logits plus every token tied with the k-th value, so its
    normaliser needs only the candidates and the number of tied tokens topk left out. In ascending order,
    which top-p walks, the tied group comes first (the smallest value), then the candidates above it.
    """
    values, indices, kth, tied, n_tied, left_out, weights = top_k_set(logits, top_k)
    norm = weights.sum(-1, keepdim=True) + left_out * weights[..., -1:]
    tie_prob = weights[..., -1:] / norm
    keep = _kept_above_ties(values, indices, weights / norm, left_out * tie_prob, 1 - top_p, tied)
    keep |= _kept_ties(tied, n_tied, tie_prob, 1 - top_p, top_is_tied=values[..., :1] == kth)
    return logits.masked_fill(~keep, float("-inf"))


def _kept_above_ties(values: torch.Tensor, indices: torch.Tensor, probs: torch.Tensor,
                     left_out_mass: torch.Tensor, threshold: float, like: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) mask of the candidates above the k-th value that top-p keeps.

    They are walked in ascending (value, token id) order, the order of a stable sort of the vocabulary,
    with the cumulative probability starting after the whole tied group (the left-out ties included).
    """
    kth = values[..., -1:]
    by_id, id_order = indices.sort(dim=-1)
    ascending, position = values.gather(-1, id_order).sort(dim=-1, stable=True)
    remove = probs.gather(-1, id_order).gather(-1, position).cumsum(-1) + left_out_mass <= threshold
    remove[..., -1] = False  # the most likely token always stays
    keep = (ascending > kth) & ~remove
    return torch.zeros_like(like).scatter_(-1, by_id.gather(-1, position), keep)


def _kept_ties(tied: torch.Tensor, n_tied: torch.Tensor, tie_prob: torch.Tensor, threshold: float,
               top_is_tied: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) mask of the tokens at the k-th value that top-p keeps.

    The m-th of them in ascending order has cumulative probability m * q, so the first
    r = #{m : m q <= threshold} go (all but one when the most likely token is among them). Which ones is
    a matter of tie-breaking: the lowest token ids go, as a stable sort would have it (transformers' sort
    is not stable, so there only the number kept is defined); a running count over the vocabulary ranks them.
    """
    removed = torch.floor(threshold / tie_prob).clamp(min=0)
    removed = torch.minimum(removed, (n_tied - top_is_tied.long()).to(removed.dtype))
    return tied & (tied.cumsum(-1, dtype=torch.int32) > removed)


def _min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """`MinPLogitsWarper`: tokens less likely than `min_p` times the most likely one go (applied last)."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def filtered_logits(logits: torch.Tensor, settings: SamplingSettings, min_p: float | None = None) -> torch.Tensor:
    """Temperature, top-k, top-p, then min_p: `generate`'s warpers in `generate`'s order, on (batch, vocab)
    float logits; removed tokens become -inf. Only top-p without top-k sorts the whole vocabulary."""
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    top_k = settings.top_k if 0 < settings.top_k < logits.shape[-1] else 0  # k >= vocab keeps everything
    if top_k and settings.top_p < 1.0:
        logits = _top_k_top_p(logits, top_k, settings.top_p)
    elif top_k:
        logits = _top_k_filter(logits, top_k)
    elif settings.top_p < 1.0:
        logits = _top_p_filter(logits, settings.top_p)
    if min_p is not None:
        logits = _min_p_filter(logits, min_p)
    return logits


def sampling_probabilities(logits: torch.Tensor, settings: SamplingSettings,
                           min_p: float | None = None) -> torch.Tensor:
    """The (batch, vocab) distribution that `sample_from_logits` draws from (one-hot argmax when greedy)."""
    logits = logits.float()
    if not settings.do_sample:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filtered_logits(logits, settings, min_p).softmax(dim=-1)


def _categorical(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(logits), without a host synchronisation.

    `argmax(p / E)` with E ~ Exp(1) i.i.d. picks index i with probability p_i (the exponential race, the
    same trick as Gumbel-max); unlike `torch.multinomial` it is plain elementwise work plus a reduction,
    so it fuses under `torch.compile` and can be captured in a CUDA graph. Noise is kept above 0 so that
    a zero draw can never make a zero-probability token win.
    """
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_().clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def sample_from_logits(logits: torch.Tensor, settings: SamplingSettings, min_p: float | None = None) -> torch.Tensor:
    """Next token per row of (batch, vocab) logits: greedy argmax, or a draw from `filtered_logits` (over the top-k
    candidates alone when top-k applies and min_p does not: `sapo.generation.topk_sampling`, the same distribution)."""
    logits = logits.float()
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    if min_p is None and 0 < settings.top_k < logits.shape[-1]:  # only the top-k candidates (and ties) can win
        scaled = logits / settings.temperature if settings.temperature != 1.0 else logits
        return top_k_draw(scaled, settings.top_k, settings.top_p)
    return _categorical(filtered_logits(logits, settings, min_p))


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, fields: CheckpointSampling,
                seen: torch.Tensor | None) -> torch.Tensor:
    """What `generate` picks from the last position's logits: the repetition penalty (when `seen` is given)
    comes first, as a logits processor, in greedy decoding too; then greedy argmax or the warpers."""
    logits = logits.float()
    if seen is not None:
        logits = penalize_repetitions(logits, seen, fields.repetition_penalty)
    return sample_from_logits(logits, settings, fields.min_p)
