"""Old import path, kept for one release: now `sapo.generation.topk_sampling`."""

from __future__ import annotations

from sapo.generation.topk_sampling import (  # noqa: F401
    top_k_draw,
    top_k_probabilities,
)
