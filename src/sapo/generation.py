"""Sampling continuations from the EMA model.

The trainer only needs "G new tokens after each of these contexts"; `SegmentSampler` is that
interface, so a faster engine can replace the Hugging Face `generate` implementation without touching
the trainer. Two engines are provided (pick one by name with `make_sampler`):

- `HFGenerateSampler` ("hf"): `model.generate` with a dynamic KV cache.
- `StaticCacheSampler` ("static"): a decode loop over a pre-allocated `transformers.StaticCache` whose
  temperature/top-k/top-p sampling and EOS tracking stay on the device (the host only looks at the
  device every `check_every` steps, to stop early once every row has ended), optionally with the decode
  step compiled by `torch.compile` (CUDA graphs), which removes most per-token launch overhead.

"auto" (the default of `SAPOConfig.generation_engine`) picks one of them per device type and decoding mode
from measurements (`auto_engine`), and falls back to `generate`, with one warning, if compiling fails.

Both draw from the same distribution: `SamplingSettings`, plus what `generate` takes from the model's
`generation_config` on its own (see `checkpoint_sampling`: the static engine applies the repetition penalty
and min_p, and refuses to run with any other field `generate` would act on).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig, StaticCache

from sapo.decode_attention import WrittenSlots, bucketed_span, decode_attention, written_slots
from sapo.decode_state import RELEASE_RULES, should_release, state_bytes
from sapo.errors import UsageError
from sapo.topk_sampling import top_k_draw

logger = logging.getLogger(__name__)

SAMPLER_NAMES = ("hf", "static")  # the keys of ENGINES (defined below the engines)
ENGINE_CHOICES = ("auto", *SAMPLER_NAMES)  # what `generation_engine` accepts


class SegmentSampler(Protocol):
    """Samples up to `max_new_tokens` tokens after each context; rows end at their first EOS."""

    def sample(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        ...


@dataclass
class SamplingSettings:
    """Sampling of the EMA model (paper: 0.7 / 50 / 0.95); `do_sample=False` gives greedy decoding."""

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    do_sample: bool = True


def cut_after_eos(tokens: Sequence[int], eos_token_ids: Collection[int]) -> list[int]:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return list(tokens[: index + 1])
    return list(tokens)


def left_pad(contexts: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: decoder-only generation appends on the right."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, context in enumerate(contexts):
        if context:
            ids[row, width - len(context):] = torch.tensor(context, dtype=torch.long)
            mask[row, width - len(context):] = 1
    return ids.to(device), mask.to(device)


class HFGenerateSampler:
    """`model.generate` with a KV cache, in batches of `batch_size` contexts.

    The config passed to `generate` fixes what SAPO decides (greedy or sampled with `SamplingSettings`, one
    row per context, lengths, special tokens, a plain tensor back); `generate` takes every other field from
    the model's `generation_config`, e.g. a checkpoint's `repetition_penalty` (see `checkpoint_sampling`).
    """

    def __init__(self, settings: SamplingSettings, *, pad_token_id: int, eos_token_ids: Collection[int],
                 batch_size: int | None = None) -> None:
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.eos_token_ids = set(eos_token_ids)
        self.batch_size = batch_size

    def sample(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if not contexts:
            return []
        step = self.batch_size or len(contexts)
        results: list[list[int]] = []
        for start in range(0, len(contexts), step):
            results.extend(self._sample_batch(model, contexts[start:start + step], max_new_tokens))
        return results

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        s = self.settings
        sampling = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p} if s.do_sample else {}
        return GenerationConfig(
            do_sample=s.do_sample, **sampling, num_beams=1, num_return_sequences=1, return_dict_in_generate=False,
            max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids), use_cache=True,
        )

    @torch.no_grad()
    def _sample_batch(self, model: nn.Module, contexts: Sequence[Sequence[int]],
                      max_new_tokens: int) -> list[list[int]]:
        device = next(model.parameters()).device
        ids, mask = left_pad(contexts, self.pad_token_id, device)
        was_training = model.training
        model.eval()
        try:
            # The model is always whole here (sharded EMAs are gathered first), so ranks need not decode in
            # lock-step, which transformers would otherwise impose under ZeRO-3 with a collective per token.
            output = model.generate(input_ids=ids, attention_mask=mask, synced_gpus=False,
                                    generation_config=self._generation_config(max_new_tokens))
        finally:
            model.train(was_training)
        new_tokens = output[:, ids.shape[1]:].tolist()
        return [cut_after_eos(row, self.eos_token_ids) for row in new_tokens]


def eos_token_ids_of(tokenizer, model: nn.Module | None = None) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids


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
    values, indices = torch.topk(logits, top_k, dim=-1)
    kth = values[..., -1:]
    tied = logits == kth
    n_tied = tied.sum(-1, keepdim=True)
    left_out = (n_tied - (values == kth).sum(-1, keepdim=True)).to(values.dtype)
    # Probabilities as softmax computes them (exp(x - max) / sum), so exact cases such as q = 1/2 stay exact.
    weights = (values - values[..., :1]).exp()
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
    candidates alone when top-k applies and min_p does not: `sapo.topk_sampling`, the same distribution)."""
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


# ------------------------------------------------------------------------------------------------
# Static-cache decode loop
# ------------------------------------------------------------------------------------------------


def _cache_argument(model: nn.Module) -> str:
    """The forward keyword of the KV cache: `cache` in recent transformers 5 releases, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through peft wrappers
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _make_decode_step(settings: SamplingSettings, fields: CheckpointSampling, pad_token_id: int,
                      cache_argument: str):
    """One decode step: forward of one token per row through the static cache, sampling, EOS bookkeeping,
    and the seen-token mask of the repetition penalty (None when there is no penalty).

    Everything stays on the device; the function has no data-dependent Python control flow, so it can be
    compiled (and captured in a CUDA graph) once per batch shape.
    """

    def step(model: nn.Module, token: torch.Tensor, position: torch.Tensor, attention_mask: torch.Tensor,
             cache: Any, finished: torch.Tensor, eos: torch.Tensor,
             seen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        outputs = model(input_ids=token.unsqueeze(-1), position_ids=position.unsqueeze(-1),
                        attention_mask=attention_mask, use_cache=True, **{cache_argument: cache})
        next_token = next_tokens(outputs.logits[:, -1], settings, fields, seen)
        next_token = next_token.masked_fill(finished, pad_token_id)
        return next_token, finished | torch.isin(next_token, eos), mark_seen(seen, next_token)

    return step


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _CompileFailed(Exception):
    """Compiling the decode step failed and the sampler has a fallback engine to use instead."""


class StaticCacheSampler:
    """Batched decoding over a pre-allocated `StaticCache`, with sampling and EOS tracking on the device.

    Same interface and sampling semantics as `HFGenerateSampler` (temperature, then top-k, then top-p, or
    greedy with `do_sample=False`; rows end at their first EOS, later tokens are dropped), and the same
    tokens as `model.generate` under greedy decoding. Per call:

    1. contexts are left-padded (sorted by length first when they span several batches of `batch_size`)
       and prefilled in one forward that writes the cache and returns only the last position's logits;
    2. each decode step feeds one token per row with explicit position ids and a constant 2-D attention
       mask over the whole cache (pads off, everything else on: causality hides the unwritten slots);
    3. the host reads the device only every `check_every` steps, to stop once every row has ended.

    `compile` (default: on for CUDA, off elsewhere) wraps the decode step in `torch.compile` with
    `compile_mode` ("reduce-overhead" uses CUDA graphs); batches are then padded to `batch_size` rows and
    the cache length rounded up to `cache_len_multiple` (default 128; 8 without compile), so a few shapes
    cover a whole run. `cache_len` fixes the cache length of compiled calls that fit in it: the trainer passes
    the rows of a generation round as `batch_size` and `max_length + token_generate_length` (a bound on
    context + new tokens) as `cache_len`, so a run compiles once per span (`cache_spans`).

    Decode state between calls (`keeps_state`): compiled, the cache and the compiled step are kept (CUDA
    graphs replay on fixed addresses), so the memory they hold is bounded by one cache of `batch_size` x
    `cache_len` plus the graphs' pool, allocated at the first call and never grown with fixed shapes
    (`release()` frees it; `release_state`, see `sapo.decode_state`, says when a call ends with a release: "auto"
    when the device's memory is tight); eager, the cache is freed at the end of every call. Compiled steps
    attend over the written slots rounded up to one of `cache_spans` lengths (`sapo.decode_attention`), eager
    ones over the written slots. Models with grouped-query
    attention decode through `sapo.decode_attention` (the query is reshaped instead of the KV cache repeated),
    set on the model for the call only.

    If compilation fails, the sampler logs one warning and then decodes with `fallback` (the "auto" engine
    passes `HFGenerateSampler`) or, without one, eagerly with its own loop.

    Like `generate`, it also applies the model's `generation_config.repetition_penalty` (prompt and sampled
    tokens, left padding excluded) and, when sampling, its `min_p`; any other field that `generate` would act
    on (no_repeat_ngram_size, typical_p, suppress_tokens...) makes `sample` raise a ValueError that names it
    (see `checkpoint_sampling`), rather than decode something else than the "hf" engine would.
    """

    def __init__(self, settings: SamplingSettings, *, pad_token_id: int, eos_token_ids: Collection[int],
                 batch_size: int | None = None, compile: bool | None = None,
                 compile_mode: str | None = "reduce-overhead", check_every: int = 16,
                 cache_len: int | None = None, cache_len_multiple: int | None = None,
                 fallback: SegmentSampler | None = None, cache_spans: int = 4,
                 release_state: str = "auto") -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.eos_token_ids = set(eos_token_ids)
        self.batch_size = batch_size
        self.compile = compile
        self.compile_mode = compile_mode
        self.check_every = check_every
        self.cache_len = cache_len
        self.cache_len_multiple = cache_len_multiple
        self.fallback = fallback
        if cache_spans < 1:
            raise ValueError(f"cache_spans must be >= 1, got {cache_spans}")
        if release_state not in RELEASE_RULES:
            raise ValueError(f"release_state must be one of {', '.join(RELEASE_RULES)}, got {release_state!r}")
        self.cache_spans = cache_spans
        self.release_state = release_state
        self.last_stats: dict[str, float] = {}
        self._cache: StaticCache | None = None
        self._cache_key: tuple[Any, ...] | None = None
        self._compiled_steps: dict[tuple[int, CheckpointSampling], Any] = {}
        self._compile_works = False
        self._compile_failed = False
        self.releases = 0  # rounds after which the kept decode state was released (`release_state`)
        self.compile_error: str | None = None  # why compiling the decode step failed, once it has
        self.unsupported: str | None = None  # why the first decode failed (the model is not served: see sample)
        self._served = False  # a decode has succeeded: later failures are errors, not a model it cannot serve

    # -- public ---------------------------------------------------------------------------------

    def sample(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if (self._compile_failed or self.unsupported is not None) and self.fallback is not None:
            return self.fallback.sample(model, contexts, max_new_tokens)
        try:
            samples = self._sample(model, contexts, max_new_tokens)
        except _CompileFailed:
            return self.fallback.sample(model, contexts, max_new_tokens)
        except (RuntimeError, TypeError, AttributeError, IndexError, KeyError, NotImplementedError) as error:
            if self._served or not contexts:  # it has decoded this model before: a failure of its own
                raise
            return self._cannot_serve(error, model, contexts, max_new_tokens)
        self._served = self._served or bool(contexts)
        return samples

    def _cannot_serve(self, error: Exception, model: nn.Module, contexts: Sequence[Sequence[int]],
                      max_new_tokens: int) -> list[list[int]]:
        """The first decode failed: the model's layers are not a static KV cache (Mamba's state-space layers,
        recurrent blocks). With a `generate` fallback ("auto") the run decodes with it, saying so once; asked for
        by name, the engine is refused in one line."""
        self.unsupported = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        name = type(getattr(model, "module", model)).__name__
        if self.fallback is None:
            raise UsageError(f"generation_engine 'static' cannot decode {name} ({self.unsupported}); use "
                             "generation_engine auto or hf") from error
        logger.warning("static decoding cannot serve %s (%s); decoding with model.generate", name, self.unsupported)
        return self.fallback.sample(model, contexts, max_new_tokens)

    def _sample(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        fields = checkpoint_sampling(getattr(model, "generation_config", None), self.settings.do_sample)
        if not contexts:
            return []
        if max_new_tokens <= 0:
            return [[] for _ in contexts]
        if any(len(context) == 0 for context in contexts):
            raise ValueError("StaticCacheSampler: every context needs at least one token")
        device = next(model.parameters()).device
        step = self.batch_size or len(contexts)
        order = list(range(len(contexts)))
        if step < len(contexts):  # batches of similar lengths waste less on padding
            order.sort(key=lambda i: len(contexts[i]))
        results: list[list[int]] = [[] for _ in contexts]
        started, decode_steps = time.perf_counter(), 0
        was_training = model.training
        model.eval()
        try:
            with decode_attention(model):
                for start in range(0, len(order), step):
                    rows = order[start:start + step]
                    samples, steps = self._sample_batch(model, [contexts[i] for i in rows], max_new_tokens, fields)
                    decode_steps += steps
                    for row, sample in zip(rows, samples, strict=True):
                        results[row] = sample
        finally:
            model.train(was_training)
            if not self.keeps_state(device):  # eager decoding gains nothing from keeping the cache
                self._cache, self._cache_key = None, None
            elif should_release(self.release_state, device, state_bytes(self._cache)):
                self.release()  # training is short of memory: the next round allocates (and compiles) again
                self.releases += 1
        self.last_stats = {"rows": float(len(contexts)), "new_tokens": float(sum(len(r) for r in results)),
                           "decode_steps": float(decode_steps), "seconds": time.perf_counter() - started}
        return results

    def uses_compile(self, device: torch.device) -> bool:
        """Whether decode steps on `device` go through `torch.compile` (default: CUDA only)."""
        if self._compile_failed:
            return False
        return self.compile if self.compile is not None else device.type == "cuda"

    def keeps_state(self, device: torch.device) -> bool:
        """Whether the cache and compiled step outlive a call on `device` (compiled decoding), so the caller should
        keep handing in the same module, with its weights refreshed in place, for the graphs to be replayed."""
        return self.uses_compile(device)

    @property
    def compile_failed(self) -> bool:
        """True once `torch.compile` of the decode step has failed (decoding continues eagerly)."""
        return self._compile_failed

    def release(self) -> None:
        """Free the kept static cache and compiled steps (they are rebuilt on the next call)."""
        self._cache, self._cache_key = None, None
        self._compiled_steps.clear()

    # -- internals ------------------------------------------------------------------------------

    def _sample_batch(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int,
                      fields: CheckpointSampling) -> tuple[list[list[int]], int]:
        device = next(model.parameters()).device
        if self.uses_compile(device):
            try:
                result = self._decode(model, contexts, max_new_tokens, fields, compiled=True)
                self._compile_works = True
                return result
            except Exception as error:
                if self._compile_works:
                    raise
                instead = "model.generate" if self.fallback is not None else "the eager decode loop"
                logger.warning("StaticCacheSampler: torch.compile of the decode step failed (%s: %s); "
                               "decoding with %s from now on", type(error).__name__, error, instead)
                self._compile_failed = True
                self.compile_error = f"{type(error).__name__}: {error}"[:300]
                self.release()
                if self.fallback is not None:
                    raise _CompileFailed from error
        return self._decode(model, contexts, max_new_tokens, fields, compiled=False)

    def _static_cache(self, model: nn.Module, batch: int, cache_len: int, device: torch.device) -> StaticCache:
        dtypes = tuple(sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()}))
        key = (id(model), batch, cache_len, device, dtypes)
        if self._cache is not None and self._cache_key == key:
            self._cache.reset()
            return self._cache
        self._cache = None  # drop the old one before allocating
        self._cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self._cache_key = key
        return self._cache

    def _step_function(self, model: nn.Module, fields: CheckpointSampling, compiled: bool):
        step = _make_decode_step(self.settings, fields, self.pad_token_id, _cache_argument(model))
        if not compiled:
            return step
        key = (id(model), fields)  # the fields are baked into the compiled step
        if key not in self._compiled_steps:
            self._compiled_steps[key] = torch.compile(step, mode=self.compile_mode, dynamic=False)
        return self._compiled_steps[key]

    @torch.no_grad()
    def _decode(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int,
                fields: CheckpointSampling, compiled: bool) -> tuple[list[list[int]], int]:
        device = next(model.parameters()).device
        rows = len(contexts)
        if compiled and self.batch_size and rows < self.batch_size:  # one batch shape for the compiled step
            contexts = [*contexts, *[contexts[-1]] * (self.batch_size - rows)]
        ids, mask = left_pad(contexts, self.pad_token_id, device)
        batch, width = ids.shape
        needed = width + max_new_tokens
        if compiled and self.cache_len is not None and needed <= self.cache_len:
            cache_len = self.cache_len  # one shape for the compiled step; eager decoding attends over less
        else:
            cache_len = _round_up(needed, self.cache_len_multiple or (128 if compiled else 8))
        cache = self._static_cache(model, batch, cache_len, device)
        # Constant over the whole decode: pads are off, every later slot on (causality hides unwritten ones).
        attention_mask = torch.ones((batch, cache_len), dtype=torch.long, device=device)
        attention_mask[:, :width] = mask
        # Steps attend over the written slots only: eager ones exactly, compiled ones rounded up to a few spans.
        with written_slots(cache_len) as slots:
            tokens, steps = self._decode_loop(model, ids, mask, attention_mask, cache, max_new_tokens, fields,
                                              compiled, slots)
        new_tokens = tokens[:rows, :steps].tolist()
        return [cut_after_eos(row, self.eos_token_ids) for row in new_tokens], steps

    def _decode_loop(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor,
                     cache: StaticCache, max_new_tokens: int, fields: CheckpointSampling, compiled: bool,
                     slots: WrittenSlots | None) -> tuple[torch.Tensor, int]:
        """Prefill, then one token per step; `slots.written` (eager decoding) follows the cache's written slots."""
        device, (batch, width) = ids.device, ids.shape
        cache_argument = _cache_argument(model)
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as generate does for left padding
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], dtype=torch.long, device=device)
        if slots is not None:
            slots.written = width
        outputs = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{cache_argument: cache})
        logits = outputs.logits[:, -1]
        del outputs
        seen = seen_token_mask(ids, mask, logits.shape[-1]) if fields.repetition_penalty != 1.0 else None
        token = next_tokens(logits, self.settings, fields, seen)
        seen = mark_seen(seen, token)
        finished = torch.isin(token, eos)
        tokens = torch.full((batch, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        tokens[:, 0] = token
        position = mask.sum(-1)  # the next position of each row
        step = self._step_function(model, fields, compiled)
        mark_step = compiled and device.type == "cuda" and self.compile_mode == "reduce-overhead"
        steps = 1
        for index in range(1, max_new_tokens):
            if index % self.check_every == 0 and bool(finished.all()):  # the only host sync of the loop
                break
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            if slots is not None:
                slots.written = bucketed_span(width + index, slots.cache_len, self.cache_spans) if compiled \
                    else width + index
            token, finished, seen = step(model, token, position, attention_mask, cache, finished, eos, seen)
            tokens[:, index] = token
            position = position + 1
            steps = index + 1
        return tokens, steps


ENGINES: dict[str, type] = {"hf": HFGenerateSampler, "static": StaticCacheSampler}
"""Generation engines by the name `--generation_engine` takes; a new engine registers here."""

AUTO_ENGINES: dict[str, str] = {"cuda": "static", "cpu": "static"}
"""The engine "auto" picks per device type, from `benchmarks/speed.py --config cpu --phases gen` (README "Speed"): on
CPU, at the 64 rows of a default generation round, the static loop (eager) decoded 1.47x (greedy) and 1.59x
(sampled) as many tokens per second as `generate` (a quiet run); on CUDA it is compiled with CUDA graphs, which
removes the per-token launch overhead that dominates `generate` there. Device types not listed use `generate`."""


def auto_engine(device: torch.device | str | None, do_sample: bool,
                generation_config: GenerationConfig | None = None) -> str:
    """The engine "auto" stands for on `device`: `AUTO_ENGINES`, except that a model whose generation_config sets
    a field only `generate` implements (see `checkpoint_sampling`) gets `generate`."""
    device_type = torch.device(device).type if device is not None else "cpu"
    engine = AUTO_ENGINES.get(device_type, "hf")
    if engine == "static":
        try:
            checkpoint_sampling(generation_config, do_sample)
        except ValueError as error:
            logger.info("generation_engine auto: using model.generate (%s)", error)
            return "hf"
    return engine


def make_sampler(name: str, settings: SamplingSettings, pad_token_id: int, eos_token_ids: Collection[int],
                 batch_size: int | None = None, *, device: torch.device | str | None = None,
                 generation_config: GenerationConfig | None = None, **options: Any) -> SegmentSampler:
    """A sampler by name from `ENGINES`, or "auto" (`auto_engine` on `device`, with `generation_config` the
    model's). `options` go to the static engine's constructor; "auto" drops them when it picks "hf", and gives
    the static engine a `generate` fallback for a failed compilation."""
    if name not in ENGINE_CHOICES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    common = {"pad_token_id": pad_token_id, "eos_token_ids": eos_token_ids, "batch_size": batch_size}
    if name == "auto":
        name = auto_engine(device, settings.do_sample, generation_config)
        options = {} if name == "hf" else {"fallback": HFGenerateSampler(settings, **common), **options}
    if name == "hf" and options:
        raise TypeError(f"make_sampler('hf') takes no options, got {sorted(options)}")
    return ENGINES[name](settings, **common, **options)
