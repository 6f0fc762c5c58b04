"""Sampling continuations from the EMA model.

The trainer only needs "G new tokens after each of these contexts"; `SegmentSampler` is that
interface, so a faster engine can replace the Hugging Face `generate` implementation without touching
the trainer. Two engines are provided (pick one by name with `make_sampler`):

- `HFGenerateSampler` ("hf"): `model.generate` with a dynamic KV cache.
- `StaticCacheSampler` ("static"): a decode loop over a pre-allocated `transformers.StaticCache` whose
  temperature/top-k/top-p sampling and EOS tracking stay on the device (the host only looks at the
  device every `check_every` steps, to stop early once every row has ended), optionally with the decode
  step compiled by `torch.compile` (CUDA graphs), which removes most per-token launch overhead.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig, StaticCache

logger = logging.getLogger(__name__)

SAMPLER_NAMES = ("hf", "static")


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
    """`model.generate` with a KV cache, in batches of `batch_size` contexts."""

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
            do_sample=s.do_sample, **sampling,
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
# On-device sampling
# ------------------------------------------------------------------------------------------------


def _top_p_filter(values_desc: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p over logits sorted in descending order, computed exactly as transformers' `TopPLogitsWarper`.

    The warper sorts ascending and removes tokens whose cumulative probability is `<= 1 - top_p`, always
    keeping the most likely token; tokens already at -inf (outside the top-k) have probability 0 and add
    nothing to the cumulative sums, so working on the top-k candidates only gives the same result.
    """
    ascending = values_desc.flip(-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False
    return values_desc.masked_fill(remove.flip(-1), float("-inf"))


def sampling_candidates(logits: torch.Tensor,
                        settings: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then top-k, then top-p (the order of `generate`'s warpers) applied to (batch, vocab) logits.

    Returns `(values, indices)`: the filtered logits of the candidates (removed ones are -inf), sorted in
    descending order, and their vocabulary ids; `indices` is None when no filter applies and `values` is
    the whole (temperature-scaled) vocabulary in its own order. With top-k only `k` candidates are kept,
    so top-p never sorts the full vocabulary.
    """
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    vocab = logits.shape[-1]
    top_k = min(settings.top_k, vocab) if settings.top_k > 0 else 0
    if not top_k and settings.top_p >= 1.0:
        return logits, None
    if top_k:
        values, indices = torch.topk(logits, top_k, dim=-1)
    else:
        values, indices = torch.sort(logits, dim=-1, descending=True)
    if settings.top_p < 1.0:
        values = _top_p_filter(values, settings.top_p)
    return values, indices


def sampling_probabilities(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The (batch, vocab) distribution that `sample_from_logits` draws from (one-hot argmax when greedy)."""
    logits = logits.float()
    if not settings.do_sample:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    values, indices = sampling_candidates(logits, settings)
    probs = values.softmax(dim=-1)
    if indices is None:
        return probs
    return torch.zeros_like(logits).scatter_(-1, indices, probs)


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


def sample_from_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Next token per row of (batch, vocab) logits: greedy argmax, or a temperature/top-k/top-p draw."""
    logits = logits.float()
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    values, indices = sampling_candidates(logits, settings)
    choice = _categorical(values)
    if indices is None:
        return choice
    return indices.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# Static-cache decode loop
# ------------------------------------------------------------------------------------------------


def _cache_argument(model: nn.Module) -> str:
    """The forward keyword of the KV cache: `cache` in recent transformers 5 releases, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through peft wrappers
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _make_decode_step(settings: SamplingSettings, pad_token_id: int, cache_argument: str):
    """One decode step: forward of one token per row through the static cache, sampling, EOS bookkeeping.

    Everything stays on the device; the function has no data-dependent Python control flow, so it can be
    compiled (and captured in a CUDA graph) once per batch shape.
    """

    def step(model: nn.Module, token: torch.Tensor, position: torch.Tensor, attention_mask: torch.Tensor,
             cache: Any, finished: torch.Tensor, eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = model(input_ids=token.unsqueeze(-1), position_ids=position.unsqueeze(-1),
                        attention_mask=attention_mask, use_cache=True, **{cache_argument: cache})
        next_token = sample_from_logits(outputs.logits[:, -1], settings)
        next_token = next_token.masked_fill(finished, pad_token_id)
        return next_token, finished | torch.isin(next_token, eos)

    return step


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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
    cover a whole run, and the cache is kept between calls (CUDA graphs need fixed addresses; `release()`
    frees it). `cache_len` fixes the cache length for every call that fits in it (in SAPO, prompt + y[:k] +
    G never exceeds `max_length`, so `cache_len=max_length` gives a single shape). If compilation fails
    the sampler logs a warning and decodes eagerly from then on.

    Only temperature, top-k and top-p are applied (as `SamplingSettings` says); other options of the model's
    `generation_config` (repetition penalty, min_p...) are not.
    """

    def __init__(self, settings: SamplingSettings, *, pad_token_id: int, eos_token_ids: Collection[int],
                 batch_size: int | None = None, compile: bool | None = None,
                 compile_mode: str | None = "reduce-overhead", check_every: int = 16,
                 cache_len: int | None = None, cache_len_multiple: int | None = None) -> None:
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
        self.last_stats: dict[str, float] = {}
        self._cache: StaticCache | None = None
        self._cache_key: tuple[Any, ...] | None = None
        self._compiled_steps: dict[int, Any] = {}
        self._compile_works = False
        self._compile_failed = False

    # -- public ---------------------------------------------------------------------------------

    def sample(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
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
            for start in range(0, len(order), step):
                rows = order[start:start + step]
                samples, steps = self._sample_batch(model, [contexts[i] for i in rows], max_new_tokens)
                decode_steps += steps
                for row, sample in zip(rows, samples, strict=True):
                    results[row] = sample
        finally:
            model.train(was_training)
            if not self.uses_compile(device):  # eager decoding gains nothing from keeping the cache
                self._cache, self._cache_key = None, None
        self.last_stats = {"rows": float(len(contexts)), "new_tokens": float(sum(len(r) for r in results)),
                           "decode_steps": float(decode_steps), "seconds": time.perf_counter() - started}
        return results

    def uses_compile(self, device: torch.device) -> bool:
        """Whether decode steps on `device` go through `torch.compile` (default: CUDA only)."""
        if self._compile_failed:
            return False
        return self.compile if self.compile is not None else device.type == "cuda"

    @property
    def compile_failed(self) -> bool:
        """True once `torch.compile` of the decode step has failed (decoding continues eagerly)."""
        return self._compile_failed

    def release(self) -> None:
        """Free the kept static cache and compiled steps (they are rebuilt on the next call)."""
        self._cache, self._cache_key = None, None
        self._compiled_steps.clear()

    # -- internals ------------------------------------------------------------------------------

    def _sample_batch(self, model: nn.Module, contexts: Sequence[Sequence[int]],
                      max_new_tokens: int) -> tuple[list[list[int]], int]:
        device = next(model.parameters()).device
        if self.uses_compile(device):
            try:
                result = self._decode(model, contexts, max_new_tokens, compiled=True)
                self._compile_works = True
                return result
            except Exception as error:
                if self._compile_works:
                    raise
                logger.warning("StaticCacheSampler: torch.compile of the decode step failed (%s: %s); "
                               "decoding without it from now on", type(error).__name__, error)
                self._compile_failed = True
                self.release()
        return self._decode(model, contexts, max_new_tokens, compiled=False)

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

    def _step_function(self, model: nn.Module, compiled: bool):
        step = _make_decode_step(self.settings, self.pad_token_id, _cache_argument(model))
        if not compiled:
            return step
        if id(model) not in self._compiled_steps:
            self._compiled_steps[id(model)] = torch.compile(step, mode=self.compile_mode, dynamic=False)
        return self._compiled_steps[id(model)]

    @torch.no_grad()
    def _decode(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int,
                compiled: bool) -> tuple[list[list[int]], int]:
        device = next(model.parameters()).device
        rows = len(contexts)
        if compiled and self.batch_size and rows < self.batch_size:  # one batch shape for the compiled step
            contexts = [*contexts, *[contexts[-1]] * (self.batch_size - rows)]
        ids, mask = left_pad(contexts, self.pad_token_id, device)
        batch, width = ids.shape
        needed = width + max_new_tokens
        if self.cache_len is not None and needed <= self.cache_len:
            cache_len = self.cache_len
        else:
            cache_len = _round_up(needed, self.cache_len_multiple or (128 if compiled else 8))
        cache = self._static_cache(model, batch, cache_len, device)
        cache_argument = _cache_argument(model)
        # Constant over the whole decode: pads are off, every later slot on (causality hides unwritten ones).
        attention_mask = torch.ones((batch, cache_len), dtype=torch.long, device=device)
        attention_mask[:, :width] = mask
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as generate does for left padding
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], dtype=torch.long, device=device)

        outputs = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{cache_argument: cache})
        token = sample_from_logits(outputs.logits[:, -1], self.settings)
        del outputs
        finished = torch.isin(token, eos)
        tokens = torch.full((batch, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        tokens[:, 0] = token
        position = mask.sum(-1)  # the next position of each row
        step = self._step_function(model, compiled)
        mark_step = compiled and device.type == "cuda" and self.compile_mode == "reduce-overhead"
        steps = 1
        for index in range(1, max_new_tokens):
            if index % self.check_every == 0 and bool(finished.all()):  # the only host sync of the loop
                break
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            token, finished = step(model, token, position, attention_mask, cache, finished, eos)
            tokens[:, index] = token
            position = position + 1
            steps = index + 1
        new_tokens = tokens[:rows, :steps].tolist()
        return [cut_after_eos(row, self.eos_token_ids) for row in new_tokens], steps


def make_sampler(name: str, settings: SamplingSettings, pad_token_id: int, eos_token_ids: Collection[int],
                 batch_size: int | None = None, **options: Any) -> SegmentSampler:
    """A sampler by name: "hf" (`HFGenerateSampler`) or "static" (`StaticCacheSampler`; `options` go to it)."""
    if name == "hf":
        if options:
            raise TypeError(f"make_sampler('hf') takes no options, got {sorted(options)}")
        return HFGenerateSampler(settings, pad_token_id=pad_token_id, eos_token_ids=eos_token_ids,
                                 batch_size=batch_size)
    if name == "static":
        return StaticCacheSampler(settings, pad_token_id=pad_token_id, eos_token_ids=eos_token_ids,
                                  batch_size=batch_size, **options)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
