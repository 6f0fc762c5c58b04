"""Attention of packed pair rows (`sapo.packing`): a dense boolean mask, or FlexAttention's block mask on CUDA.

A packed row `prefix + real suffix + rejected suffix` is attended under a block-structured mask: causal, except
that rejected-suffix queries skip the real suffix. Given as a dense (B, 1, P, P) mask, SDPA can only use a kernel
that takes an arbitrary mask and computes every block, and transformers repeats grouped K/V heads for it
(`repeat_kv`), where TRL's unpacked rows get causal flash attention. FlexAttention's `BlockMask` records which
128x128 blocks are empty (skipped: the upper triangle, the rejected suffix against the real one, padding), full or
partial, and its kernel serves grouped heads without copies. Both masks come from one rule
(`sapo.packing.allowed_attention`), so the two give the same attention.

A model attends through FlexAttention only while its implementation is `PAIR_ATTENTION`, a dispatcher registered
with transformers' `AttentionInterface`: a `BlockMask` goes to FlexAttention, anything else to transformers' own
SDPA function, so every other forward (unpacked rows, generation, evaluation) is unchanged. The dispatcher also
serves a recomputing backward (activation checkpointing), which runs after any context manager would have exited.
transformers never writes the implementation into a saved config.

Where FlexAttention cannot run a call (attention dropout, soft-capping, position biases, attention sinks; gradients
on a CPU, where torch has no FlexAttention backward), the dispatcher materialises the same mask and runs SDPA.
`pair_attention="auto"` chooses FlexAttention on CUDA only: on a CPU the compiled FlexAttention forward was slower
than SDPA with the dense mask in a one-off check (0.10 s against 0.05 s for one 14-head, 2-KV-head layer on 8 rows
of 512 tokens, 2 threads, after a 27 s compile), and without compiling it materialises every score
(`benchmarks/pair_scoring.py --config cpu`). Asked for by name on a
CPU, it runs uncompiled without gradients (reference and evaluation forwards), and the dense mask elsewhere.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sapo.packing import allowed_attention

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the dense mask everywhere
    BlockMask = create_block_mask = create_mask = flex_attention = None

PAIR_ATTENTION = "sapo_pair_attention"
"""The implementation name of the dispatcher (SDPA, with FlexAttention for block masks)."""

PAIR_ATTENTIONS = ("auto", "flex", "dense")
"""The `pair_attention` setting's choices."""

FLEX_ATTENTIONS = (PAIR_ATTENTION, "flex_attention")
"""Implementations a packed row's `BlockMask` is given to (transformers' own flex_attention takes one as well)."""

FLEX_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux")
"""Attention arguments the dispatcher's FlexAttention call does not apply (it falls back to SDPA for them)."""


def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    return flex_attention is not None


def flex_wanted(setting: str, device: torch.device) -> bool:
    """Whether packed pairs should attend through FlexAttention: asked for by name, or `auto` on CUDA."""
    if setting not in PAIR_ATTENTIONS:
        raise ValueError(f"pair_attention must be one of {', '.join(PAIR_ATTENTIONS)}, got {setting!r}")
    return flex_available() and (setting == "flex" or (setting == "auto" and device.type == "cuda"))


def flex_runs_here(device: torch.device) -> bool:
    """Whether a forward on `device` can run FlexAttention now: CUDA always; a CPU only without gradients."""
    return flex_available() and (device.type != "cpu" or not torch.is_grad_enabled())


def pair_block_mask(prefix: torch.Tensor, real_end: torch.Tensor, end: torch.Tensor, width: int) -> BlockMask:
    """The `BlockMask` of a batch of packed rows (pairs' prefix lengths, real-row ends and packed ends, (B,))."""

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return allowed_attention(query, key, prefix[batch], real_end[batch], end[batch])

    return create_block_mask(mask_mod, prefix.shape[0], None, width, width, device=prefix.device)


def dense_mask_of(block_mask: BlockMask) -> torch.Tensor:
    """(B, 1, Q, KV) bool: the token-level mask a `BlockMask`'s rule describes."""
    query_length, key_length = block_mask.seq_lengths
    return create_mask(block_mask.mask_mod, block_mask.shape[0], 1, query_length, key_length,
                       device=block_mask.kv_num_blocks.device)


@cache
def _compiled_flex_attention() -> Any:
    """FlexAttention compiled once per process (uncompiled, it materialises every score)."""
    return torch.compile(flex_attention)


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs in one dtype, as SDPA gets them: under autocast its dtype (autocast casts SDPA's inputs, not
    FlexAttention's, and rotary embeddings leave query and key in fp32 beside a half-precision value)."""
    device_type = tensors[0].device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensors[0].dtype
    return tuple(tensor.to(dtype) for tensor in tensors)


def _flex_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
               scaling: float | None) -> torch.Tensor:
    query, key, value = _common_dtype(query, key, value)
    # The main kernel even for short rows: the decoding kernel needs a power-of-two count of query heads per KV head.
    options = {"FORCE_USE_FLEX_ATTENTION": True}
    if query.device.type == "cpu":  # uncompiled (no gradients here, see flex_runs_here): torch warns of that
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            return flex_attention(query, key, value, block_mask=block_mask, scale=scaling,
                                  enable_gqa=query.shape[1] != key.shape[1], kernel_options=options)
    # Inside a compiled model (torch_compile=True) dynamo compiles the plain function with the rest of the graph.
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    return flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                kernel_options=options)


def pair_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: query (b, n_heads, q, d), key/value (b, n_kv_heads, kv, d)."""
    if not flex_available() or not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    plain = dropout == 0.0 and all(kwargs.get(name) is None for name in FLEX_UNSUPPORTED_KWARGS)
    if not plain or not flex_runs_here(query.device):
        return sdpa_attention_forward(module, query, key, value, dense_mask_of(attention_mask), dropout=dropout,
                                      scaling=scaling, is_causal=False, **kwargs)
    output = _flex_call(query, key, value, attention_mask, scaling)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(PAIR_ATTENTION, pair_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(PAIR_ATTENTION, sdpa_mask)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (callers unwrap DDP and the like: `sapo.logprobs.inner_model`)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_switch_attention(model: nn.Module) -> bool:
    """Models written against `AttentionInterface` can switch implementations at run time (others only warn)."""
    can = getattr(model, "_can_set_attn_implementation", None)
    return hasattr(model, "set_attn_implementation") and can is not None and bool(can())


def flex_refusal(model: nn.Module) -> str | None:
    """Why `model`'s packed pairs cannot attend through the dispatcher (None where they can)."""
    base = base_model(model)
    implementation = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if not flex_available():
        return "this torch has no FlexAttention"
    if implementation in FLEX_ATTENTIONS:
        return None
    if implementation != "sdpa":
        return f"attention implementation {implementation!r} is not sdpa"
    if not getattr(base, "_supports_flex_attn", False):
        return f"{type(base).__name__} does not support FlexAttention"
    if not can_switch_attention(base):
        return f"{type(base).__name__} cannot switch attention implementations"
    return None


def attend_pairs_with_flex(model: nn.Module) -> str | None:
    """Switch `model` (attending through SDPA) to the dispatcher; returns why not, or None once it attends so."""
    reason = flex_refusal(model)
    if reason is None:
        base = base_model(model)
        if base.config._attn_implementation == "sdpa":
            base.set_attn_implementation(PAIR_ATTENTION)
    return reason


def attends_pairs_with_flex(model: nn.Module) -> bool:
    """Whether `model`'s packed pairs get a BlockMask (its implementation is the dispatcher or flex_attention)."""
    return getattr(getattr(base_model(model), "config", None), "_attn_implementation", None) in FLEX_ATTENTIONS


def attend_pairs_densely(model: nn.Module) -> None:
    """Undo `attend_pairs_with_flex` (the dispatcher back to plain SDPA)."""
    base = base_model(model)
    if getattr(getattr(base, "config", None), "_attn_implementation", None) == PAIR_ATTENTION:
        base.set_attn_implementation("sdpa")
