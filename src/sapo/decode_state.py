"""Old import path, kept for one release: now `sapo.generation.decode_state`."""

from __future__ import annotations

from sapo.generation.decode_state import (  # noqa: F401
    RELEASE_RULES,
    TIGHT_FRACTION,
    device_memory,
    memory_tight,
    should_release,
    state_bytes,
)
