"""What every recipe is: `Recipe` (a pair source, with the class attributes and class methods that declare what
it needs and how it generates) and `StepServices` (what the trainer hands it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sapo.batching import pad_pairs
from sapo.buffer import ReplayEntry
from sapo.generation import SamplingSettings
from sapo.losses import nll_term_weight

Pending = tuple[list[int], list[int], int | None]  # (prompt, real response, dataset index) awaiting generation


@dataclass
class StepServices:
    """What a recipe may ask of the trainer during a step."""

    generate: Callable[[str, Sequence[Sequence[int]], int], list[list[int]]]  # (EMA|REFERENCE, contexts, max new)
    refresh_reference_from_policy: Callable[[], None]
    any_rank: Callable[[bool], bool]  # True on every rank if True on any (for collectives all ranks must join)
    record: Callable[[str, float], None]  # a metric value, averaged until the next log
    pad_token_id: int
    eos_token_ids: set[int]
    # `rejected_judge`: (example indices, real responses, rejected responses) -> whether each rejected one is judged
    # worse than its real one; None without a judge
    judge_rewrites: Callable[[Sequence[int | None], Sequence[list[int]], Sequence[list[int]]], list[bool]] | None = None
    reset_optimizer: Callable[[], None] | None = None  # forget the optimizer's running statistics


class Recipe:
    """A pair source; class attributes say what it needs (read by `SAPOConfig` and the trainer)."""

    name: ClassVar[str]
    needs_ema: ClassVar[bool] = False  # an EMA model and a replay buffer (self-augmentation)
    needs_rejected_data: ClassVar[bool] = False  # records must carry `rejected`
    supervised: ClassVar[bool] = False  # trains on real responses alone (NLL), no pairs
    fixed_loss_type: ClassVar[str | None] = None  # a loss the recipe is defined by
    allowed_loss_types: ClassVar[tuple[str, ...] | None] = None  # None: any loss
    fixed_reference: ClassVar[bool] = False  # the recipe manages the reference itself; ref_update_mode is 'fixed'
    # Where the rejected side of its eval pairs comes from (`sapo.heldout.rejected_source`): 'segment' (the start
    # model rewrites a segment), 'whole' (the start model answers the prompt), 'data' (the records' own), None.
    eval_rejected: ClassVar[str | None] = "whole"
    # SAPOConfig fields only this recipe (and its subclasses) reads: a run of another recipe leaves them at their
    # defaults, so its model card does not list them
    settings: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def sampling_settings(cls, args: Any) -> SamplingSettings:
        """How its generations are sampled: the paper's temperature/top-k/top-p."""
        return SamplingSettings(args.temperature, args.top_k, args.top_p)

    @classmethod
    def generation_rows(cls, args: Any) -> int:
        """The most sequences one generation call decodes (the static engine pads every call to it): one batch."""
        return args.per_device_train_batch_size

    @classmethod
    def generation_cache_len(cls, args: Any) -> int:
        """A bound on context + new tokens of any generation call (the static engine's one cache length): prompts
        (<= max_prompt_length) answered with up to spin_max_new_tokens."""
        return args.max_prompt_length + args.spin_max_new_tokens

    @classmethod
    def reference_moves(cls, args: Any) -> bool:
        """Whether the reference ever changes during the run (refreshed SAPO references, SPIN opponents)."""
        return False

    def __init__(self, args: Any, services: StepServices, seed: int) -> None:
        self.args, self.services = args, services

    def batch(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> dict[str, torch.Tensor]:
        """The padded batch of this micro-step, from the incoming demonstrations (ragged token lists). Beside the
        tensors it carries host-side lists (the Trainer moves tensors only): which buffer entry each pair is (-1:
        none) and the lengths of its prompt and responses, so that the trainer can reuse and remember reference
        scores without reading the device."""
        entries = self.pairs(inputs, step, max_steps)
        batch: dict[str, Any] = pad_pairs(entries, self.services.pad_token_id)
        batch["entry_ids"] = [e.entry_id for e in entries]
        batch["pair_lengths"] = [(len(e.prompt), len(e.real), len(e.rejected)) for e in entries]
        batch["identical"] = [e.rejected == e.real for e in entries]
        batch["placeholder"] = self.drew_nothing
        batch["signal"] = not self.drew_nothing and self.carries_signal(entries)
        return batch

    drew_nothing: bool = False  # the last batch holds stand-in pairs: there was nothing to draw (see SelfAugmented)

    def set_epoch_length(self, batches: int) -> None:
        """How many batches this process sees per epoch (told once training knows it)."""

    def carries_signal(self, entries: Sequence[ReplayEntry]) -> bool:
        """Whether these pairs give the loss a gradient: an identical pair has a zero margin whatever the weights
        (zero gradient), unless the loss adds the real response's NLL (ORPO, `nll_weight`)."""
        if nll_term_weight(self.args.loss_type, self.args.nll_weight) > 0:
            return True
        return any(e.rejected != e.real for e in entries)

    def pairs(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> list[ReplayEntry]:
        raise NotImplementedError

    def reference_refresh(self, step: int, period: int) -> str | None:
        """After optimizer step `step`: which copy the reference becomes (EMA, 'policy'), or None."""
        return None

    def cached_reference_logps(self, entry_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The reference's per-token log-probs (real, rejected) remembered for these pairs, None where unknown."""
        return [None] * len(entry_ids)

    def remember_reference_logps(self, entry_id: int, real: torch.Tensor, rejected: torch.Tensor) -> None:
        """Keep what the reference scored for a pair, valid until `reference_moved` (pairs with no id are dropped)."""

    def reference_moved(self) -> None:
        """The reference's weights changed: forget every remembered score."""

    @classmethod
    def configure(cls, args: Any) -> None:
        """Resolve and check the recipe's own settings in `SAPOConfig` (called for every recipe while the config is
        built, so a recipe can refuse its settings in a run of another recipe)."""

    def schedule_period(self, num_training_steps: int) -> int | None:
        """Steps after which the learning-rate schedule restarts, or None for one schedule over the run."""
        return None

    def learning_rate_scale(self, period: int) -> float:
        """Factor on the learning rate in the `period`-th restart of the schedule (see `schedule_period`)."""
        return 1.0

    @property
    def beta(self) -> float:
        """The loss's beta for the pairs of the current step."""
        return self.args.beta

    def state_files(self, rank: int) -> list[str]:
        return []

    def save(self, directory: Path, rank: int) -> None:
        """Write this rank's recipe state into a checkpoint's sapo_state directory."""

    def load(self, directory: Path, rank: int) -> None:
        """Read what `save` wrote."""
