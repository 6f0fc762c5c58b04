"""Old import path, kept for one release: now `sapo.run.paths`."""

from __future__ import annotations

from sapo.run.paths import (  # noqa: F401
    BUFFER_FILE_GLOB,
    BUFFER_FILE_RE,
    CHECKPOINT_METRICS_FILE,
    CHECKPOINT_PREFIX,
    CHECKPOINT_RE,
    CHECKSUMS_FILE,
    EMA_DIR,
    FINAL_PARTIAL,
    FINAL_RECORD_FILE,
    FINAL_STAGING,
    LOCK_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    RUN_STATE_FILE,
    STAGING_DIR,
    STATE_DIR,
    TRAINER_STATE_FILE,
    buffer_file,
    copy_file,
    pending_file,
    segment_rng_file,
    spin_file,
    step_state_file,
)
