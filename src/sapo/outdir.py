"""Old import path, kept for one release: now `sapo.run.outdir`."""

from __future__ import annotations

from sapo.run.outdir import (  # noqa: F401
    clear_previous_final,
    has_checkpoints,
    holds_only_start_files,
    holds_results,
    no_checkpoint_message,
    not_empty_message,
    refuse_inputs_in_output_dir,
)
