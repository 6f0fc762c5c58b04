"""Judging a model while it trains: greedy generation scored by the task judge, as points of a curve whose clock
leaves the judging out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .settings import Settings


def judged(model: torch.nn.Module, tokenizer: Any, records: Sequence[dict], settings: Settings) -> dict[str, Any]:
    """Greedy generation judged per prompt: overall and per-family mean, mean length, per-prompt scores."""
    from sapo import tasks
    from sapo.judging import evaluate

    was_training = model.training
    result = evaluate(model, tokenizer, records, tasks.judge, max_new_tokens=settings.max_new_tokens,
                      batch_size=settings.eval_batch_size)
    model.train(was_training)
    families = tasks.score_responses(records, result["responses"])
    return {"overall": families.pop("overall"), "by_family": families, "mean_length": result["mean_length"],
            "scores": result["scores"], "responses": result["responses"]}


def curve_point(step: int, seconds: float, result: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "seconds": round(seconds, 2), "overall": result["overall"], **result["by_family"],
            "mean_length": result["mean_length"]}


def curve_callback(records: Sequence[dict], settings: Settings, every: int, model_of: Callable[[], Any],
                    tokenizer_of: Callable[[], Any], probe: Callable[[Any], dict[str, Any]] | None = None):
    """A TrainerCallback judging the model every `every` steps and after the last (and, with `probe`, adding
    its fixed-pair diagnostics to the point); its clock excludes judging and probing."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.last: dict[str, Any] | None = None
            self.judging = 0.0
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def training_seconds(self) -> float:
            return time.perf_counter() - self.started - self.judging

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % every == 0 or step == state.max_steps:
                seconds, clock = self.training_seconds(), time.perf_counter()
                self.last = judged(model_of(), tokenizer_of(), records, settings)
                point = curve_point(step, seconds, self.last)
                if probe is not None:
                    point["probe"] = probe(model_of())
                self.points.append(point)
                self.judging += time.perf_counter() - clock

    return Curve()


def quiet_libraries() -> None:
    """Transformers' warnings and progress bars off: the benchmark's log is its own lines."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
