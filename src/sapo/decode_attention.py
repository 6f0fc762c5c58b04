"""Old import path, kept for one release: now `sapo.generation.decode_attention`."""

from __future__ import annotations

from sapo.generation.decode_attention import (  # noqa: F401
    DECODE_ATTENTION,
    REPLACED,
    SPAN_MULTIPLE,
    WrittenSlots,
    bucketed_span,
    decode_attention,
    gqa_decode_attention,
    written_slots,
)
