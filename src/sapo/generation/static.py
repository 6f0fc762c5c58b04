"""`StaticCacheSampler` ("static"): a decode loop over a pre-allocated `StaticCache` with sampling and EOS
tracking on the device, optionally compiled (CUDA graphs); falls back to `generate` if compiling fails."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn
from transformers import StaticCache

from sapo.errors import UsageError
from sapo.generation.decode_attention import WrittenSlots, bucketed_span, decode_attention, written_slots
from sapo.generation.decode_state import RELEASE_RULES, should_release, state_bytes
from sapo.generation.protocol import SamplingSettings, SegmentSampler, cut_after_eos, left_pad
from sapo.generation.sampling import CheckpointSampling, checkpoint_sampling, mark_seen, next_tokens, seen_token_mask

logger = logging.getLogger(__name__)

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
    (`release()` frees it; `release_state`, see `sapo.generation.decode_state`, says when a call ends with a
    release: "auto" when the device's memory is tight); eager, the cache is freed at the end of every call.
    Compiled steps attend over the written slots rounded up to one of `cache_spans` lengths
    (`sapo.generation.decode_attention`), eager ones over the written slots. Models with grouped-query
    attention decode through `sapo.generation.decode_attention` (the query is reshaped instead of the KV cache
    repeated),
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
