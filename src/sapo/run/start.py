"""`SAPOTrainer.train` around `Trainer.train`: one run per output_dir, a resume validated before anything is
written, stop signals and repeated non-finite steps ending in a checkpoint (`TrainingStopped`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from sapo.callbacks import _NothingToTrain, _ResumeStart
from sapo.config import sapo_fields
from sapo.errors import USER_ERRORS, CheckpointError, OutputDirError, TrainingStopped, UsageError
from sapo.run.fserrors import filesystem_error
from sapo.run.lock import (
    OutputDirLock,
    check_output_dir,
    check_output_lock,
    clear_previous_checkpoints,
    remove_if_created_empty,
)
from sapo.run.outdir import (
    clear_previous_final,
    holds_only_start_files,
    no_checkpoint_message,
    refuse_inputs_in_output_dir,
)
from sapo.run.paths import METRICS_FILE
from sapo.run.publish import recover_staging
from sapo.run.resume import check_allowed_changes, run_setting_names
from sapo.run.signals import on_stop_signals
from sapo.run.state import output_dir_gone_error
from sapo.sharding import any_rank
from sapo.step_guard import NONFINITE_EXIT_CODE

logger = logging.getLogger("sapo.trainer")  # the trainer's logger: users filter the run's messages by it


def train(trainer: Any, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
    """`Trainer.train`, plus: one run per `output_dir` (a lock, held until the final `save_model`); a resume
    is validated before anything is written and is exact or refused; a checkpoint at the run's last step trains
    nothing more; SIGINT/SIGTERM save a checkpoint and stop, and repeated non-finite steps stop with a checkpoint
    (both raise `TrainingStopped` after saving), except that a signal during the last step lets the run end
    normally (the final `save_model` then reports it); a non-empty `output_dir` is only reused when resuming or
    with `overwrite_output_dir`."""
    try:
        resume_from_checkpoint = resolve_resume(trainer, resume_from_checkpoint)
        prepare_output_dir(trainer, resume_from_checkpoint)
    except USER_ERRORS:
        release_output_dir(trainer)
        remove_created_output_dir(trainer)
        raise
    start = _ResumeStart(trainer, resume_from_checkpoint)
    trainer.add_callback(start)
    try:
        with on_stop_signals(lambda reason, code: setattr(trainer, "_stop_reason", (reason, code))):
            result = Trainer.train(trainer, resume_from_checkpoint=resume_from_checkpoint, **kwargs)
    except _NothingToTrain:
        logger.info("%s is at the run's last step (%d): nothing more to train", resume_from_checkpoint,
                    trainer.state.global_step)
        trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        trainer.is_in_train = False
        result = TrainOutput(trainer.state.global_step, 0.0, {})
    except Exception as error:  # a full or read-only disk: OSError, RuntimeError (torch) or SafetensorError
        full = filesystem_error(error, Path(trainer.args.output_dir)) or output_dir_gone_error(trainer)
        release_output_dir(trainer)
        if full is None:
            raise
        raise full from error
    except BaseException:
        release_output_dir(trainer)
        raise
    finally:
        trainer.remove_callback(start)
    if trainer._stop_reason is not None:
        reason, code = trainer._stop_reason
        if trainer.state.global_step >= trainer.state.max_steps and code != NONFINITE_EXIT_CODE:
            logger.warning("%s during the last step: training is complete, the final save follows", reason)
            return result  # save_model() reports the signal once the final outputs are written
        release_output_dir(trainer)
        trainer._stop_reason = None
        checkpoint = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
        raise TrainingStopped(f"training stopped at step {trainer.state.global_step}: {reason}; checkpoint "
                              f"saved to {checkpoint}; resume with --resume_from_checkpoint {checkpoint}",
                              checkpoint, code)
    return result


def resolve_resume(trainer: Any, resume: str | bool | None) -> str | None:
    """The checkpoint to resume (`true`: the latest), validated like any path; refusals agree across ranks."""
    error: Exception | None = None
    try:
        if trainer.is_world_process_zero():  # a live run's checkpoints change under us: say so first
            check_output_lock(Path(trainer.args.output_dir))
        if trainer.args.resume_allow_changes:
            check_allowed_changes(trainer.args.resume_allow_changes,
                                  run_setting_names(trainer.args, [f.name for f in sapo_fields()]))
        if isinstance(resume, str) and resume.lower() in ("true", "false"):
            resume = resume.lower() == "true"
        if resume is True:
            last = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
            if last is None:
                raise CheckpointError(no_checkpoint_message(Path(trainer.args.output_dir)))
            resume = last
        if resume:
            trainer.validate_checkpoint(Path(resume))
    except USER_ERRORS as caught:
        error = caught
    if any_rank(error is not None, trainer.args.device):
        raise error or CheckpointError("another process of this run refused the checkpoint (its message says why)")
    return str(resume) if resume else None


def prepare_output_dir(trainer: Any, resume: str | None) -> None:
    """Before anything is written: refuse another run's directory, take the lock, finish a publish a crash
    interrupted. (metrics.jsonl is brought back to the resumed step once training starts, see `_ResumeStart`.)"""
    out = Path(trainer.args.output_dir)

    def check() -> None:
        refuse_inputs_in_output_dir(out, input_paths(trainer))
        check_output_dir(out, resuming=resume is not None, overwrite=trainer.args.overwrite_output_dir)

    take_output_lock(trainer, out, check)
    if trainer.is_world_process_zero():
        recover_staging(out)
        if resume is None and trainer.args.overwrite_output_dir:
            removed = clear_previous_final(out) + [p.name for p in clear_previous_checkpoints(out)]
            (out / METRICS_FILE).unlink(missing_ok=True)  # the old run's rows; this run writes its own
            if removed:
                logger.warning("overwrite_output_dir: removed the previous run's %s", ", ".join(removed))
        elif resume is None and holds_only_start_files(out):
            logger.warning("output_dir %s holds only the start of a run that stopped before its first "
                           "checkpoint: nothing to resume there, so this run starts over", out)


def input_paths(trainer: Any) -> dict[str, str | None]:
    """Where the models this run trains from were loaded (their `name_or_path`), which output_dir must not touch."""
    def source(model: Any) -> str | None:
        return getattr(getattr(model, "config", None), "_name_or_path", None) or None

    return {"model_name_or_path": source(trainer.policy),
            "ref_model": source(getattr(trainer.copies, "reference_module", None))}


def take_output_lock(trainer: Any, out: Path, check: Any = None) -> None:
    """The main process runs `check` and takes `out`'s lock; a refusal is raised on every rank."""
    error: Exception | None = None
    if trainer.is_world_process_zero():
        try:
            if check is not None:
                check()
            if trainer._output_lock is None or trainer._output_lock.directory != out:
                release_output_dir(trainer)
                trainer._output_lock = OutputDirLock(out)
            trainer._output_lock.acquire()
        except USER_ERRORS as caught:
            error = caught
    if any_rank(error is not None, trainer.args.device):
        raise error or OutputDirError(f"output_dir {out}: refused by the main process (its message says why)")


def release_output_dir(trainer: Any) -> None:
    if trainer._output_lock is not None:
        trainer._output_lock.release()


def remove_created_output_dir(trainer: Any) -> None:
    """Leave no trace of a run that never started (the Trainer may have created the directory)."""
    if trainer.args.should_save:
        remove_if_created_empty(Path(trainer.args.output_dir), trainer._first_created)


def refuse_an_uncoordinated_launch(args: Any) -> None:
    """Every process the launcher started must be part of one job, or N processes would each train alone into one
    output_dir. Checked before anything is created."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size != launched:
        raise UsageError(f"the launcher started {launched} processes but accelerate joined {args.world_size} of them "
                         "into this job (DeepSpeed needs GPUs; on a machine without GPUs use plain DDP: torchrun "
                         "--nproc_per_node N -m sapo.cli train ...)")


def refuse_a_dropped_engine(trainer: Any) -> None:
    """An engine asked for must be the one accelerate set up: it silently trains plain DDP instead of FSDP on CPU
    processes. Checked before anything is written."""
    if trainer.args.fsdp and not trainer.is_fsdp_enabled:
        remove_created_output_dir(trainer)
        raise UsageError(f"FSDP was asked for but accelerate set up {trainer.accelerator.distributed_type.value} "
                         "(FSDP needs GPUs; drop --fsdp on a CPU machine)")


def will_shard(trainer: Any) -> bool:
    """Whether the engine will shard the policy's parameters (FSDP2, ZeRO-3), known before it does."""
    if trainer.is_fsdp_enabled:
        if getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (or "
                             "fsdp_config={'fsdp_version': 2}); see examples/accelerate/fsdp2-8gpu.yaml")
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)
