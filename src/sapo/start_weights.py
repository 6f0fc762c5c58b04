"""Old import path, kept for one release: now `sapo.run.start_weights`."""

from __future__ import annotations

from sapo.run.start_weights import (  # noqa: F401
    NOT_WEIGHTS,
    PIECE,
    WEIGHT_SUFFIXES,
    StartWeights,
    files_fingerprint,
    tensors_fingerprint,
    weight_files,
)
