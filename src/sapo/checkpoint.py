"""Old import path, kept for one release: the run directory's parts now live in `sapo.run`
(`lock`, `publish`, `resume`, `signals`) and metrics.jsonl in `sapo.metrics`."""

from __future__ import annotations

from sapo.metrics import (  # noqa: F401
    is_summary_row,
    read_metrics,
    restore_metrics,
    save_metrics_rows,
    truncate_metrics,
)
from sapo.run.lock import (  # noqa: F401
    OutputDirLock,
    check_output_dir,
    check_output_lock,
    clear_previous_checkpoints,
    first_missing,
    lock_holder_state,
    remove_if_created_empty,
)
from sapo.run.publish import (  # noqa: F401
    atomic_write_text,
    checksum_problems,
    directory_checksums,
    publish_directory,
    publish_final,
    read_json,
    recover_staging,
    write_checksums,
    write_json,
)
from sapo.run.resume import (  # noqa: F401
    DATA_SETTING,
    FINGERPRINTS,
    FREE_SAPO_FIELDS,
    REFERENCE_WEIGHTS_SETTING,
    START_WEIGHTS_SETTING,
    TRAINER_TRAJECTORY_FIELDS,
    WORLD_SIZE_SETTING,
    check_allowed_changes,
    checkpoint_step,
    data_fingerprint,
    read_run_state,
    rng_state_from_json,
    rng_state_to_json,
    run_setting_names,
    run_settings,
    settings_differences,
    validate_checkpoint,
    write_manifest,
)
from sapo.run.signals import (  # noqa: F401
    on_stop_signals,
)
