"""Learning-rate schedules that restart: a recipe may train in periods that each run as a fresh run (SPIN's
iterations), so the Trainer's schedule is built for one period and its LambdaLR factors repeat, scaled per period."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import Trainer

from sapo.errors import UsageError

logger = logging.getLogger("sapo.trainer")


def restarting_scheduler(trainer: Any, num_training_steps: int, optimizer: Any = None) -> Any:
    """`SAPOTrainer.create_scheduler`: the Trainer's schedule, restarted every `recipe.schedule_period` steps."""
    period = trainer.recipe.schedule_period(num_training_steps)
    if period is None or trainer.lr_scheduler is not None:
        return Trainer.create_scheduler(trainer, num_training_steps, optimizer)
    scheduler = Trainer.create_scheduler(trainer, period, optimizer)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scale = trainer.recipe.learning_rate_scale
        scheduler.lr_lambdas = [_restarting_every(period, f, scale) for f in scheduler.lr_lambdas]
        return scheduler
    if trainer.args.spin_learning_rates:
        raise UsageError(f"spin_learning_rates: lr_scheduler_type {trainer.args.lr_scheduler_type!r} cannot restart "
                         "at each iteration; use linear, cosine, constant_with_warmup or another LambdaLR schedule")
    logger.warning("lr_scheduler_type %r cannot restart every %d steps; it runs once over the whole run",
                   trainer.args.lr_scheduler_type, period)
    trainer.lr_scheduler = None
    return Trainer.create_scheduler(trainer, num_training_steps, optimizer)


def _restarting_every(period: int, schedule: Any, scale: Any) -> Any:
    # A closure, not a callable object: LambdaLR would try to save an object's attributes in its state_dict. The
    # factor is a function of the step alone, so a resumed run continues the same per-period rates.
    return lambda step: scale(step // period) * schedule(step % period)
