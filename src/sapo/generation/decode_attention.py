"""Attention of the static engine's decode: grouped-query attention without a repeated KV cache, and eager
steps that read only the written part of the cache.

transformers' SDPA path (`sdpa_attention_forward`) handles grouped-query attention (n_heads > n_kv_heads) in
one of three ways: `enable_gqa=True` when there is no mask, a query reshape for one-token queries (eager only:
it is skipped while dynamo traces), or `repeat_kv`, which materialises the K/V cache n_heads / n_kv_heads
times, per layer, per token. A static-cache decode step always has a mask (left padding) and is compiled,
so it gets `repeat_kv`: for Qwen2-0.5B (14 heads, 2 KV heads) that is 7 copies of the whole cache read and
written per layer per token, more memory traffic than the attention itself.

`gqa_decode_attention` reshapes the one-token query instead, (b, n_heads, 1, d) -> (b, n_kv_heads, groups, d),
so that each KV head serves its `groups` query heads as if they were `groups` query positions; the mask,
(b, 1, 1, kv), broadcasts over them. Everything else (prefill, no groups, per-head masks, position biases,
softcapping) goes to transformers' own SDPA function unchanged. It is registered under `DECODE_ATTENTION`
with `AttentionInterface` and its masks are SDPA's (`AttentionMaskInterface`), and `decode_attention` sets
it on a model only while decoding, so training forwards never see it.

The same function also keeps eager decoding from reading cache slots nothing has written yet. A static cache is
allocated for context + new tokens, and transformers attends over all of it, masking the unwritten tail: on a CPU,
where a decode step's attention is bound by memory bandwidth (every step reads the whole K/V cache), that is a
quarter of the attention's traffic wasted when 128 tokens follow a 128-token context, and half of a prefill's
attention. Inside `written_slots(cache_len)`, the decode loop states how many slots are written before each
forward, and full-length layers attend over those only (a view of the cache, no copy).

Compiled decoding needs fixed shapes, since each new span is a new graph (dynamo guards on the span, and a CUDA
graph is recorded per shape), so its span is the written slots rounded up to one of `spans` lengths
(`bucketed_span`): a run compiles at most `spans` graphs of the step, each reading at most `cache_len / spans`
slots more than are written, where reading the whole cache wasted up to G + padding slots per step
(1280 read for at most 1024 written at the gpu benchmark's shape).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sapo.pair_attention import PAIR_ATTENTION, base_model, can_switch_attention

DECODE_ATTENTION = "sapo_gqa_decode"
# Implementations this path computes exactly (eager, flash and other custom ones are left alone): SDPA, and the
# packed pairs' dispatcher, which is SDPA for every mask but a packed row's BlockMask.
REPLACED = ("sdpa", PAIR_ATTENTION)


def _packs(module: nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether the query reshape applies: grouped heads, one query token, a mask shared by all heads."""
    groups = getattr(module, "num_key_value_groups", 1)
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    return groups > 1 and query.shape[2] == 1 and shared_mask and plain


@dataclass
class WrittenSlots:
    """The first `written` slots of every full-length (`cache_len`) cache layer hold keys; the rest are empty."""

    cache_len: int
    written: int


# A module global rather than a ContextVar: torch.compile cannot trace ContextVar.get (it would break the compiled
# decode step's graph at every layer), while a global that is None outside eager decoding is one guard.
_written_slots: WrittenSlots | None = None


@contextmanager
def written_slots(cache_len: int) -> Iterator[WrittenSlots]:
    """Decode forwards inside the block attend over `written` slots of the cache only: set `written` (the slots
    filled once this forward has stored its keys) before each forward."""
    global _written_slots
    outer, _written_slots = _written_slots, WrittenSlots(cache_len, cache_len)
    try:
        yield _written_slots
    finally:
        _written_slots = outer


SPAN_MULTIPLE = 64  # compiled spans are multiples of this many slots (friendly to attention kernels' tiling)


def bucketed_span(written: int, cache_len: int, spans: int) -> int:
    """The slots a compiled decode step attends over: `written` rounded up to a multiple of
    ceil(cache_len / spans) (itself a multiple of `SPAN_MULTIPLE`), at most `cache_len`, so that at most `spans`
    distinct lengths (compiled graphs) occur for one cache; `spans=1` is the whole cache."""
    if spans < 1:
        raise ValueError(f"spans must be >= 1, got {spans}")
    bucket = -(-cache_len // spans)
    bucket = -(-bucket // SPAN_MULTIPLE) * SPAN_MULTIPLE
    return min(cache_len, -(-written // bucket) * bucket)


def _written_part(key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None):
    """Key, value and mask cut to the written slots, for layers whose cache has the full length (a sliding-window
    layer's shorter, rolling cache is left whole)."""
    slots = _written_slots
    length = key.shape[-2]
    if slots is None or length != slots.cache_len or not 0 < slots.written < length:
        return key, value, attention_mask
    if attention_mask is not None and attention_mask.shape[-1] == length:
        attention_mask = attention_mask[..., :slots.written]
    return key[:, :, :slots.written], value[:, :, :slots.written], attention_mask


def gqa_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: query (b, n_heads, q, d), key/value (b, n_kv_heads, kv, d)."""
    key, value, attention_mask = _written_part(key, value, attention_mask)
    if not _packs(module, query, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, _ = query.shape
    kv_heads = key.shape[1]
    # Head h uses KV head h // groups (repeat_kv's layout), so (heads,) splits as (kv_heads, groups).
    packed = query.reshape(batch, kv_heads, heads // kv_heads, query.shape[-1])
    output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                              dropout_p=dropout, scale=scaling)
    return output.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, gqa_decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)


@contextmanager
def decode_attention(model: nn.Module) -> Iterator[bool]:
    """`model` attends with `gqa_decode_attention` inside the block (yields True) when it attends through SDPA and
    can switch implementations; otherwise it is left as it is (yields False). The implementation is restored on
    exit."""
    base = base_model(model)
    config = getattr(base, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original not in REPLACED or not can_switch_attention(base):
        yield False
        return
    base.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield True
    finally:
        base.set_attn_implementation(original)
