"""Checkpoints: the Trainer's checkpoint written into `.staging/` and published in one rename, with SAPO's own
state (`sapo_state/`: copies, recipe state, counters, eval pairs, the run's manifest and settings) saved and loaded
back, and a checkpoint validated against this run before a resume writes anything."""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer

from sapo._hf_compat import checkpoint_run_dir, checkpoints_written_into, loss_accumulators, rotate_checkpoints
from sapo.config import sapo_fields
from sapo.errors import CheckpointError, OutputDirError
from sapo.heldout import EVAL_PAIRS_FILE, EvalPairs, load_eval_pairs, save_eval_pairs
from sapo.metrics import metric_values, save_metrics_rows
from sapo.run.paths import (
    CHECKPOINT_METRICS_FILE,
    CHECKPOINT_PREFIX,
    LOCK_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    RUN_STATE_FILE,
    STAGING_DIR,
    STATE_DIR,
    TRAINER_STATE_FILE,
    step_state_file,
)
from sapo.run.publish import publish_directory, read_json, write_checksums, write_json
from sapo.run.resume import data_fingerprint, read_run_state, run_settings, validate_checkpoint, write_manifest
from sapo.sharding import any_rank

logger = logging.getLogger("sapo.trainer")


def save_checkpoint(trainer: Any, model: nn.Module, trial: Any) -> None:
    """Write the whole checkpoint into a staging directory, fsync it, then rename it into place.

    A crash at any moment leaves either the complete new checkpoint or none (plus the previous
    ones, which are only rotated out after the rename).
    """
    check_output_dir_still_ours(trainer)
    run_dir = checkpoint_run_dir(trainer, trial)
    name = f"{CHECKPOINT_PREFIX}-{trainer.state.global_step}"
    staging = run_dir / STAGING_DIR
    if trainer.args.should_save and (staging / name).exists():
        shutil.rmtree(staging / name)
    trainer.accelerator.wait_for_everyone()
    try:
        with checkpoints_written_into(trainer, staging):  # Trainer writes (and rotates) in staging
            Trainer._save_checkpoint(trainer, model, trial)
            name_the_published_best(trainer, run_dir, staging / name)
            trainer.save_sapo_state(staging / name / STATE_DIR)
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            write_checksums(staging / name)  # last: a resume checks every file against it
    except Exception:
        if trainer.args.should_save:  # a partly written checkpoint is never used: free its space now
            shutil.rmtree(staging / name, ignore_errors=True)
        raise
    if trainer.args.should_save:
        publish_directory(staging / name, run_dir / name)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)
    trainer.accelerator.wait_for_everyone()


def check_output_dir_still_ours(trainer: Any) -> None:
    """Before a checkpoint: stop if output_dir was deleted, moved or taken over meanwhile (its lock is gone),
    rather than recreate it and write half a run into it. Ranks agree."""
    gone = output_dir_gone_error(trainer)
    if any_rank(gone is not None, trainer.args.device):
        raise gone or OutputDirError(f"output_dir {trainer.args.output_dir}: the main process lost it (its message "
                                     "says why)")


def output_dir_gone_error(trainer: Any) -> OutputDirError | None:
    lock = trainer._output_lock
    if not trainer.is_world_process_zero() or lock is None or not lock.held or lock.still_ours():
        return None
    return OutputDirError(f"output_dir {trainer.args.output_dir}: its lock file {LOCK_FILE} is gone or another run's "
                          "(was the directory deleted or moved during the run?), so this run no longer owns it "
                          f"and stopped at step {trainer.state.global_step} without writing more there; whatever "
                          "checkpoints remain can be resumed with --resume_from_checkpoint")


def name_the_published_best(trainer: Any, run_dir: Path, staged: Path) -> None:
    """The Trainer names the best checkpoint where it wrote it (inside .staging/); name it where it is published
    instead, in the state and in the staged trainer_state.json, so rotation keeps it and load_best_model_at_end
    finds it."""
    best = trainer.state.best_global_step
    published = run_dir / f"{CHECKPOINT_PREFIX}-{best}"
    if best and (best == trainer.state.global_step or published.is_dir()):
        trainer.state.best_model_checkpoint = str(published)
        if trainer.args.should_save:
            trainer.state.save_to_json(str(staged / TRAINER_STATE_FILE))


def sapo_state_files(trainer: Any) -> list[str]:
    """Files of `sapo_state/` this run writes (and needs to resume), for this rank."""
    rank = trainer.args.process_index
    return [MANIFEST_FILE, RUN_STATE_FILE, step_state_file(rank), *trainer.copies.state_files(rank),
            *trainer.recipe.state_files(rank)]


def trajectory_settings(trainer: Any) -> dict[str, Any]:
    """The settings that shape this run's trajectory, recorded in checkpoints and compared on resume."""
    if trainer._data_fingerprint is None:
        trainer._data_fingerprint = data_fingerprint(trainer.train_dataset)
    return run_settings(trainer.args, [f.name for f in sapo_fields()], world_size=trainer.args.world_size,
                        data=trainer._data_fingerprint, start_weights=trainer._start_weights.fingerprint(),
                        reference_weights=trainer._reference_weights and trainer._reference_weights.fingerprint())


def save_sapo_state(trainer: Any, directory: Path) -> None:
    """The copies, the recipe's state, the counters and the run's manifest and settings, per rank; safetensors
    and JSON, no pickle."""
    directory.mkdir(parents=True, exist_ok=True)
    rank = trainer.args.process_index
    if trainer.args.should_save:
        write_manifest(directory, dict(zip(trainer.copies.names, trainer.copies.params, strict=True)),
                       {"ref_update_steps": trainer.ref_update_steps, "settings": trainer.run_settings(),
                        "save_only_model": bool(trainer.args.save_only_model),
                        "global_step": trainer.state.global_step})
        save_metrics_rows(Path(trainer.args.output_dir) / METRICS_FILE, directory / CHECKPOINT_METRICS_FILE,
                          trainer.state.global_step)
    write_json(directory / step_state_file(rank), {
        "nonfinite_steps": trainer.nonfinite_steps, "nonfinite_in_a_row": trainer._nonfinite_in_a_row,
        "no_signal_steps": trainer.no_signal_steps,
        "metrics": metric_values(trainer), "timing": trainer._timing, **loss_accumulators(trainer)})
    trainer.copies.save(directory, rank, trainer.args.should_save)
    trainer.recipe.save(directory, rank)
    if trainer.args.should_save and trainer._eval_pairs:  # optional: a run may add eval data when resumed
        save_eval_pairs(directory / EVAL_PAIRS_FILE, {name: (pairs.eval_set.fingerprint, pairs.rejected)
                                                      for name, pairs in trainer._eval_pairs.items()})


def load_sapo_state(trainer: Any, directory: Path) -> None:
    rank = trainer.args.process_index
    try:
        trainer.copies.load(directory, rank)
        trainer.recipe.load(directory, rank)
        restore_eval_pairs(trainer, load_eval_pairs(directory / EVAL_PAIRS_FILE))
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # validated first; this is a last guard
        raise CheckpointError(f"{directory}: cannot load the saved state ({error})") from None
    trainer.ref_update_steps = read_run_state(directory).get("ref_update_steps") or trainer.ref_update_steps
    step_state = read_json(directory / step_state_file(rank))
    trainer.nonfinite_steps = step_state["nonfinite_steps"]
    trainer._nonfinite_in_a_row = step_state["nonfinite_in_a_row"]
    trainer.no_signal_steps = step_state.get("no_signal_steps", 0)  # absent in checkpoints of older versions
    trainer._metrics = defaultdict(list, {name: list(values) for name, values in step_state["metrics"].items()})
    trainer._timing = dict(step_state["timing"])
    trainer._resumed_step_state = step_state


def restore_eval_pairs(trainer: Any, saved: dict[str, tuple[str, list[list[int]] | None]]) -> None:
    """The checkpoint's eval pairs, for each eval set that is the same data as when they were made."""
    for name, eval_set in trainer._eval_sets.items():
        if name in saved and saved[name][0] == eval_set.fingerprint:
            trainer._eval_pairs[name] = EvalPairs(eval_set, saved[name][1])
        elif name in saved:
            logger.warning("eval set %s is not the data the checkpoint's eval pairs were made for; new pairs are "
                           "made", repr(name) if name else "(eval_dataset)")


def validate_resume_checkpoint(trainer: Any, path: Path) -> None:
    """Fail early, before anything is written, when `path` cannot resume this run exactly: missing or changed
    files, another model, or settings that differ (unless named in `resume_allow_changes`). Only the main
    process reads every file for its checksum; the others check presence and sizes."""
    validate_checkpoint(path, dict(zip(trainer.copies.names, trainer.copies.params, strict=True)),
                        trainer.sapo_state_files(), settings=trainer.run_settings(),
                        allow_changes=list(trainer.args.resume_allow_changes or ()),
                        verify_content=trainer.is_world_process_zero())


def load_best_model(trainer: Any) -> None:
    """The best checkpoint's policy (Trainer) and its EMA model and reference, so the final outputs are the
    best step's whole set."""
    Trainer._load_best_model(trainer)
    try:
        trainer.copies.load(Path(trainer.state.best_model_checkpoint) / STATE_DIR, trainer.args.process_index)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{trainer.state.best_model_checkpoint}: cannot load the best checkpoint's EMA model "
                              f"({error})") from None
