"""The guards run before each optimizer step: a step whose pairs carry no signal, or whose loss or gradient is
non-finite, has its gradients dropped so the optimizer leaves weights (and moments) alone; repeated non-finite
steps stop the run with a checkpoint."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sapo.sharding import any_rank, local_shard

logger = logging.getLogger("sapo.trainer")

NONFINITE_EXIT_CODE = 3  # exit status of a run stopped by repeated non-finite steps
NO_SIGNAL_WARNING_STEPS = 10  # skipped steps in a row after which the run says why it is not learning


def gradients_are_finite(trainer: Any) -> bool:
    """From the Trainer's total norm of this step (non-finite iff some gradient entry is; engines that clip
    across ranks give every rank the same norm); engines that give none have their local gradients read."""
    norm, trainer._grad_norm = trainer._grad_norm, None
    if hasattr(norm, "full_tensor"):  # FSDP2: a sharded norm; the full one is the same on every rank
        norm = norm.full_tensor()
    if isinstance(norm, (torch.Tensor, float)):
        return bool(torch.isfinite(torch.as_tensor(norm)))
    grads = [local_shard(p.grad, trainer.copies.sharding) for p in trainer.copies.params if p.grad is not None]
    finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True
    if trainer.copies.sharded:  # each rank sees its own shard of the gradient: skip on all or none
        finite = not any_rank(not finite, trainer.args.device)
    return finite


def skip_step_without_signal(trainer: Any) -> bool:
    """`skip_no_signal_steps`: a step none of whose pairs on any rank carries a gradient (identical pairs, or
    stand-ins while nothing can be drawn) changes nothing: gradients dropped, so the optimizer leaves weights and
    moments alone, and the EMA stays. Without it AdamW would still apply its momentum and weight decay, and
    would normalise rounding residue into a full-size update. Returns whether the step is skipped."""
    has_signal, trainer._step_has_signal = trainer._step_has_signal, False
    if not trainer.args.skips_no_signal_steps or not trainer.recipe.needs_ema:
        return False
    if trainer.args.world_size > 1:
        has_signal = any_rank(has_signal, trainer.args.device)
    if has_signal:
        trainer._no_signal_in_a_row = 0
        return False
    for param in trainer.copies.params:
        param.grad = None
    trainer._grad_norm = None
    trainer._step_skipped = True
    trainer.no_signal_steps += 1
    trainer._no_signal_in_a_row += 1
    if trainer._no_signal_in_a_row == NO_SIGNAL_WARNING_STEPS:
        logger.warning("%d optimizer steps in a row had no pair that carries signal (%d rewrites dropped so far): "
                       "the EMA model reproduces these demonstrations, so SAPO has nothing to learn from them; "
                       "use demonstrations the model has not learned, a higher temperature, or a rejected_judge "
                       "that accepts more rewrites", trainer._no_signal_in_a_row, getattr(trainer.recipe, "dropped", 0))
    return True


def skip_step_if_nonfinite(trainer: Any) -> None:
    """Drop the gradients of a step whose loss or gradient is NaN/inf, so the optimizer leaves weights alone."""
    params = trainer.copies.params
    finite = gradients_are_finite(trainer)
    trainer._step_skipped = not finite
    if finite:
        trainer._nonfinite_in_a_row = 0
        return
    for param in params:
        param.grad = None
    trainer.nonfinite_steps += 1
    trainer._nonfinite_in_a_row += 1
    logger.warning("step %d: non-finite loss or gradient; step skipped (%d in a row, %d in total)",
                   trainer.state.global_step + 1, trainer._nonfinite_in_a_row, trainer.nonfinite_steps)
    if trainer._nonfinite_in_a_row >= trainer.args.max_nonfinite_steps:
        trainer._stop_reason = (f"{trainer._nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                             "gradient (lower learning_rate, check the data, or use bf16 instead of fp16)",
                             NONFINITE_EXIT_CODE)
