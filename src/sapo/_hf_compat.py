"""Every place sapo relies on `transformers.Trainer` internals (private methods, attributes, helpers), in one file.

Checked on transformers 5.25 (the version this file was last read against; pyproject requires >=5.23,<6: a major
release may rename any of these, so raise the bound only after reading the new `trainer.py` against this list).

Private methods `SAPOTrainer` overrides (each a one-line delegate in `sapo.trainer`):
- `_prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)`: returns `(model, train_dataloader)`
  after the engine has wrapped the model; the copies are bound to the wrapped policy there.
- `_get_grad_norm(model, grad_norm=None)`: the step's total gradient norm (the non-finite guard reads it).
- `_save_checkpoint(model, trial)`, `_save(output_dir, state_dict)`: writing a checkpoint and a model directory.
- `_load_best_model()`: loading the best checkpoint at the end (`load_best_model_at_end`).

Private attributes and methods read or written here:
- `_tr_loss`, `_globalstep_last_logged`: the loss accumulated since the last log, saved with a checkpoint so a
  resumed run logs the same mean loss (`loss_accumulators`, `restore_loss_accumulators`).
- `_get_output_dir(trial)`: where the Trainer writes a checkpoint; redirected into `.staging/` while one is written
  (`checkpoint_run_dir`, `checkpoints_written_into`).
- `_prepare_inputs(batch)`: moving an eval batch to the device as the Trainer does (`prepare_inputs`).
- `trainer_utils.rotate_checkpoints`: the Trainer's rotation, run once a checkpoint is published.

Public but unstable parts used elsewhere: `model_accepts_loss_kwargs` (set False in `SAPOTrainer.__init__`),
`callback_handler` and the progress callback's `training_bar` (`sapo.callbacks._LiveProgress`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import rotate_checkpoints

TRANSFORMERS_CHECKED = "5.25"

__all__ = ["TRANSFORMERS_CHECKED", "checkpoint_run_dir", "checkpoints_written_into", "loss_accumulators",
           "prepare_inputs", "restore_loss_accumulators", "rotate_checkpoints"]


def loss_accumulators(trainer: Any) -> dict[str, Any]:
    """The Trainer's loss accumulated since the last log and the step of that log (empty outside training)."""
    tr_loss = getattr(trainer, "_tr_loss", None)
    return ({"tr_loss": tr_loss.item(), "globalstep_last_logged": trainer._globalstep_last_logged}
            if isinstance(tr_loss, torch.Tensor) else {})


def restore_loss_accumulators(trainer: Any, saved: dict[str, Any]) -> None:
    """Give back accumulators saved by `loss_accumulators` (a resumed run then logs the loss the whole run would)."""
    if "tr_loss" in saved and isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
        trainer._tr_loss += saved["tr_loss"]
        trainer._globalstep_last_logged = saved["globalstep_last_logged"]


def checkpoint_run_dir(trainer: Any, trial: Any) -> Path:
    """The directory the Trainer writes checkpoints into (output_dir, or a trial's directory)."""
    return Path(trainer._get_output_dir(trial=trial))


@contextlib.contextmanager
def checkpoints_written_into(trainer: Any, directory: Path) -> Iterator[None]:
    """While inside: the Trainer writes (and rotates) checkpoints in `directory`."""
    trainer._get_output_dir = lambda trial=None: str(directory)
    try:
        yield
    finally:
        del trainer._get_output_dir  # back to the class's method


def prepare_inputs(trainer: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """A batch on the device, as the Trainer prepares its own."""
    return trainer._prepare_inputs(batch)
