"""`Spin` (spin): whole responses of the frozen previous iterate against the real ones, iteration by iteration."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sapo import metrics as m
from sapo.buffer import ReplayEntry
from sapo.copies import REFERENCE  # which copy generates
from sapo.generation import SamplingSettings
from sapo.losses import REFERENCE_LOSS_TYPES
from sapo.recipes.base import Recipe, StepServices
from sapo.run.paths import spin_file

SPIN_PAPER_PRESET = {"spin_learning_rates": [5e-7, 5e-7, 1e-7, 1e-7], "spin_betas": [0.1, 0.1, 0.1, 5.0],
                     "spin_reset_optimizer": True, "spin_end_with_eos": True}
"""uclaml/SPIN's scripts: finetune.sh and finetune_iter1.sh run config.yaml's learning_rate 5e-7 and beta 0.1,
finetune_iter2.sh passes learning_rate 1e-7, finetune_iter3.sh learning_rate 1e-7 and beta 5.0; each script is a
new run (a new optimizer); generated answers are re-rendered with the chat template, so each ends with EOS."""


class Spin(Recipe):
    """SPIN: the frozen previous iterate (held as the reference) writes whole responses, trained against the real
    ones with a reference loss; every `steps_per_iteration` steps the opponent becomes the current policy and
    the learning-rate schedule restarts, as in the SPIN code. Optionally (`spin_preset paper`) each iteration has its
    own learning rate and beta, starts with fresh optimizer state, and cut responses end with EOS, as in its
    scripts."""

    name = "spin"
    settings = ("spin_iterations", "spin_preset", "spin_learning_rates", "spin_betas", "spin_reset_optimizer",
                "spin_end_with_eos", "spin_do_sample", "spin_temperature", "spin_max_new_tokens")
    allowed_loss_types = REFERENCE_LOSS_TYPES
    fixed_reference = True

    @classmethod
    def sampling_settings(cls, args: Any) -> SamplingSettings:
        """The opponent samples as the SPIN code does: greedy, or plain temperature sampling."""
        return SamplingSettings(temperature=args.spin_temperature, top_k=0, top_p=1.0, do_sample=args.spin_do_sample)

    @classmethod
    def reference_moves(cls, args: Any) -> bool:
        """The opponent (held as the reference) becomes the current policy every iteration."""
        return True

    def __init__(self, args: Any, services: StepServices, seed: int) -> None:
        super().__init__(args, services, seed)
        self.iteration = -1
        self.rejected: dict[int, list[int]] = {}  # the opponent's response per example, this iteration

    @classmethod
    def configure(cls, args: Any) -> None:
        """The preset fills the per-iteration settings; spin_iterations defaults to their length; learning_rate and
        beta become the first iteration's values (what the optimizer starts from and the card shows)."""
        spin_only = ("spin_preset", "spin_learning_rates", "spin_betas")
        if args.recipe != cls.name:  # the base class's no-op configure serves every other recipe
            given = [name for name in spin_only if getattr(args, name) is not None]
            if given or args.spin_reset_optimizer or args.spin_end_with_eos:
                names = given + [n for n in ("spin_reset_optimizer", "spin_end_with_eos") if getattr(args, n)]
                raise ValueError(f"SAPOConfig.{names[0]} applies to recipe 'spin' only, not {args.recipe!r}")
            args.spin_iterations = 3 if args.spin_iterations is None else args.spin_iterations
            return
        if args.spin_preset is not None:
            cls._apply_preset(args)
        lengths = {name: len(getattr(args, name)) for name in ("spin_learning_rates", "spin_betas")
                   if getattr(args, name) is not None}
        if args.spin_iterations is None:
            args.spin_iterations = max(lengths.values(), default=3)
        for name, length in lengths.items():
            values = getattr(args, name)
            if length != args.spin_iterations:
                raise ValueError(f"SAPOConfig.{name} has {length} value(s), one per iteration, but spin_iterations is "
                                 f"{args.spin_iterations}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in values):
                raise ValueError(f"SAPOConfig.{name} must be finite numbers > 0, got {values}")
        if args.spin_learning_rates is not None:
            args.learning_rate = float(args.spin_learning_rates[0])
        if args.spin_betas is not None:
            args.beta = float(args.spin_betas[0])
        if args.spin_reset_optimizer and args.deepspeed:
            raise ValueError("SAPOConfig.spin_reset_optimizer: DeepSpeed owns its optimizer state; drop one of them")

    @staticmethod
    def _apply_preset(args: Any) -> None:
        if args.spin_preset != "paper":
            raise ValueError(f"SAPOConfig.spin_preset must be one of paper; got {args.spin_preset!r}")
        for name, value in SPIN_PAPER_PRESET.items():
            if isinstance(value, list) and getattr(args, name) not in (None, value):
                raise ValueError(f"SAPOConfig.spin_preset {args.spin_preset!r} sets {name}; give one or the other")
            setattr(args, name, list(value) if isinstance(value, list) else value)

    def steps_per_iteration(self, max_steps: int) -> int:
        return max(1, math.ceil(max_steps / self.args.spin_iterations))

    def schedule_period(self, num_training_steps: int) -> int | None:
        return self.steps_per_iteration(num_training_steps)

    def learning_rate_scale(self, period: int) -> float:
        rates = self.args.spin_learning_rates
        if not rates:
            return 1.0
        return rates[min(period, len(rates) - 1)] / self.args.learning_rate

    @property
    def beta(self) -> float:
        betas = self.args.spin_betas
        return self.args.beta if not betas else betas[min(max(self.iteration, 0), len(betas) - 1)]

    def pairs(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> list[ReplayEntry]:
        rejected = self._opponent_responses(inputs, step // self.steps_per_iteration(max_steps))
        return [ReplayEntry(list(p), list(y), list(r), 0, len(r))
                for p, y, r in zip(inputs["prompt_ids"], inputs["response_ids"], rejected, strict=True)]

    def _opponent_responses(self, inputs: dict[str, list[Any]], iteration: int) -> list[list[int]]:
        """Generated lazily for the examples of each batch, once per example and iteration: the opponent is frozen
        within an iteration, so this equals generating for all prompts up front, without the up-front pass."""
        if iteration != self.iteration:
            self._start_iteration(iteration)
        missing = [i for i, index in enumerate(inputs["index"]) if index not in self.rejected]
        if self.services.any_rank(bool(missing)):  # gathering a sharded opponent is collective: all ranks join
            prompts = [inputs["prompt_ids"][i] for i in missing]
            room = max((self.args.max_length - len(p) for p in prompts), default=0)
            samples = self.services.generate(REFERENCE, prompts, min(room, self.args.spin_max_new_tokens))
            for i, sample in zip(missing, samples, strict=True):
                room = self.args.max_length - len(inputs["prompt_ids"][i])
                self.rejected[inputs["index"][i]] = self._ended(list(sample[:room]), inputs["response_ids"][i], room)
        return [self.rejected[index] for index in inputs["index"]]

    def _start_iteration(self, iteration: int) -> None:
        if iteration > 0:
            self.services.refresh_reference_from_policy()
            if self.args.spin_reset_optimizer and self.services.reset_optimizer is not None:
                self.services.reset_optimizer()
        self.iteration, self.rejected = iteration, {}
        self.services.record(m.SPIN_ITERATION, float(iteration))
        self.services.record(m.SPIN_BETA, float(self.beta))

    def _ended(self, sample: list[int], real: Sequence[int], room: int) -> list[int]:
        """With spin_end_with_eos, a response that stops without an end token (cut at its budget) gets the one the
        real response ends with (the chat template's end of turn) appended, as SPIN's re-rendering appends EOS
        after the cut text; within `room` (max_length) the last generated token gives way to it."""
        ends = self.services.eos_token_ids
        if not self.args.spin_end_with_eos or not sample or sample[-1] in ends:
            return sample
        end = real[-1] if real and real[-1] in ends else min(ends)
        return [*sample[: max(room - 1, 0)], end][:room]

    def state_files(self, rank: int) -> list[str]:
        return [spin_file(rank)]

    def save(self, directory: Path, rank: int) -> None:
        state = {"iteration": self.iteration, "rejected": {str(k): v for k, v in self.rejected.items()}}
        (directory / spin_file(rank)).write_text(json.dumps(state))

    def load(self, directory: Path, rank: int) -> None:
        state = json.loads((directory / spin_file(rank)).read_text())
        self.iteration = state["iteration"]
        self.rejected = {int(k): v for k, v in state["rejected"].items()}
