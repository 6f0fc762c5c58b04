"""The `TrainerCallback`s that place SAPO's work in the Trainer's loop.

- `_SAPOStepHooks`: before each optimizer step, the no-signal and non-finite guards (`sapo.step_guard`); after it,
  the EMA update and reference refresh (`SAPOTrainer._after_optimizer_step`) and the stop check.
- `_HeldOutPairsAtStart`: the eval pairs exist before the first step (made by the start model).
- `_ResumeStart`: metrics.jsonl brought back to the resumed step, the Trainer's loss accumulators restored.
- `_LiveProgress`: the latest loss, margin, accuracy, buffer fill and throughput on the progress bar.
- `LogLines`: without the bar (`disable_tqdm`), one short line per logged row instead of the Trainer's whole dict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sapo._hf_compat import restore_loss_accumulators
from sapo.heldout_eval import heldout_pairs
from sapo.metrics import BUFFER_SIZE, LIVE_METRICS, append_metrics_rows, log_line, restore_metrics, truncate_metrics
from sapo.run.paths import CHECKPOINT_METRICS_FILE, METRICS_FILE, STATE_DIR
from sapo.run.resume import checkpoint_step
from sapo.step_guard import skip_step_if_nonfinite, skip_step_without_signal


class _SAPOStepHooks(TrainerCallback):
    """SAPO's once-per-optimizer-step work, placed around the Trainer's optimizer step."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.trainer.ref_update_steps is None:  # default: one epoch of optimizer steps
            batches = len(train_dataloader) if train_dataloader is not None else 1
            self.trainer.ref_update_steps = max(1, math.ceil(batches / args.gradient_accumulation_steps))
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            self.trainer.recipe.set_epoch_length(len(train_dataloader))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not skip_step_without_signal(self.trainer):
            skip_step_if_nonfinite(self.trainer)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()
        if state.global_step >= state.max_steps:  # a run shorter than logging_steps still logs its training rows
            control.should_log = True
        if self.trainer._should_stop():
            control.should_save = True
            control.should_training_stop = True


class _HeldOutPairsAtStart(TrainerCallback):
    """Before the first training step (after a resumed checkpoint's state is loaded), the eval pairs exist: made by
    the start model, or restored with the checkpoint."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        for key in self.trainer._eval_sets:
            heldout_pairs(self.trainer, key)


class _NothingToTrain(Exception):
    """The resumed checkpoint is already at the run's last step."""


class _ResumeStart(TrainerCallback):
    """At the start of training, once the Trainer has loaded the checkpoint and knows max_steps: bring metrics.jsonl
    back to the resumed step, stop before any step when the checkpoint is the run's end (the Trainer would train
    one step past max_steps), and give back the Trainer's loss accumulators saved with the checkpoint."""

    def __init__(self, trainer: Any, checkpoint: str | None) -> None:
        self.trainer, self.checkpoint = trainer, checkpoint
        self.resumed_step = checkpoint_step(checkpoint) if checkpoint else 0

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        finished = self.resumed_step > 0 and state.global_step >= state.max_steps
        metrics = Path(args.output_dir) / METRICS_FILE
        if trainer.is_world_process_zero() and self.checkpoint:
            restore_metrics(metrics, Path(self.checkpoint) / STATE_DIR / CHECKPOINT_METRICS_FILE, self.resumed_step,
                            keep_summary=finished)
        elif trainer.is_world_process_zero() and metrics.exists():
            truncate_metrics(metrics, 0)
        if trainer.is_world_process_zero() and self.resumed_step == 0 and trainer._rows_before_training:
            append_metrics_rows(trainer, trainer._rows_before_training)  # a baseline evaluate() of a fresh run
        trainer._rows_before_training = []
        if finished:
            raise _NothingToTrain
        restore_loss_accumulators(trainer, trainer._resumed_step_state or {})


class _LiveProgress(TrainerCallback):
    """Shows the latest loss, margin, accuracy, buffer fill and generation throughput on the training bar."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = next((getattr(cb, "training_bar", None) for cb in self.trainer.callback_handler.callbacks
                    if getattr(cb, "training_bar", None) is not None), None)
        postfix = {short: f"{logs[key]:.3g}" for key, short in LIVE_METRICS.items() if key in (logs or {})}
        if bar is None or not postfix:  # e.g. the end-of-training summary row
            return
        if "buffer" in postfix:
            postfix["buffer"] = f"{int(logs[BUFFER_SIZE])}/{self.trainer.args.max_replay_buffer_size}"
        bar.set_postfix(postfix, refresh=True)


class LogLines(TrainerCallback):
    """Takes the place of transformers' `PrinterCallback` (which prints every logged dict, some 600 characters a
    row for SAPO) when the progress bar is off: a line of the key metrics (`sapo.metrics.log_line`); metrics.jsonl
    and report_to integrations still get every value."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(log_line(logs, state.global_step, state.max_steps), flush=True)
