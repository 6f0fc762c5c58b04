"""Recipes: where each step's training pairs come from.

Every method the paper compares is the same training step on different pairs, so a recipe is a *pair
source*: it says what it needs (an EMA model, a reference, rejected responses in the data), turns the
incoming batch of demonstrations into the padded batch the loss is computed on, and owns its state and
checkpoint files. The trainer builds one by name and calls it; adding a method is one class here.

- `SelfAugmented` (sapo, sapo-dpo, sapo-orpo): the EMA model rewrites one segment of each incoming real
  response; the pairs go into a replay buffer, and the step trains on a draw from it (SPEC §1).
- `OfflinePairs` (dpo, orpo): the data's own chosen/rejected pairs.
- `Spin` (spin): whole responses of the frozen previous iterate against the real ones, iteration by iteration.
- `Supervised` (sft): the real responses alone, for NLL.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch

from sapo.buffer import ReplayBuffer, ReplayEntry
from sapo.copies import EMA, REFERENCE  # which copy generates
from sapo.losses import LOSSES, REFERENCE_LOSS_TYPES
from sapo.packing import packed_pair_ids
from sapo.run.paths import buffer_file, pending_file, segment_rng_file, spin_file
from sapo.run.resume import rng_state_from_json, rng_state_to_json
from sapo.segments import SegmentRewrite, rewrite_segments


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                  pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """(prompt, response) token pairs as one right-padded batch; `loss_mask` marks response tokens."""
    width = max(len(p) + len(r) for p, r in sequences)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt):length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pad_pairs(entries: Sequence[ReplayEntry], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Real and rejected sequences of the pairs in one batch (real rows first): one forward scores both. The batch
    also carries each pair packed into one row around its shared prefix (`packed_input_ids`, `prefix_lengths`;
    see `sapo.packing`), which the trainer scores instead where the model allows it."""
    return pad_pair_sequences([(e.prompt, e.real, e.rejected) for e in entries], pad_token_id)


def pair_rows(batch: dict[str, Any], pairs: Sequence[int]) -> dict[str, Any]:
    """The tensors of a `pad_pairs` batch for some of its pairs only (real rows, then rejected rows, as in
    the batch; the same padded width)."""
    count = batch["loss_mask"].shape[0] // 2
    index = torch.tensor(list(pairs), device=batch["loss_mask"].device)
    both = torch.cat([index, index + count])
    rows = {name: batch[name][both] for name in ("input_ids", "attention_mask", "loss_mask")}
    for name in ("packed_input_ids", "prefix_lengths"):  # one row per pair
        if name in batch:
            rows[name] = batch[name][index]
    return rows


def pad_pair_sequences(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                       pad_token_id: int) -> dict[str, torch.Tensor]:
    """`pad_pairs` of (prompt, real, rejected) token lists: replay entries, or the eval sets' pairs."""
    batch = pad_sequences([(p, real) for p, real, _ in pairs] + [(p, rejected) for p, _, rejected in pairs],
                          pad_token_id)
    full = [([*p, *real], [*p, *rejected]) for p, real, rejected in pairs]
    batch["packed_input_ids"], batch["prefix_lengths"] = packed_pair_ids(full, pad_token_id)
    return batch


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
        (zero gradient), unless the loss adds the real response's NLL (ORPO)."""
        return LOSSES[self.args.loss_type].adds_nll or any(e.rejected != e.real for e in entries)

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


class Supervised(Recipe):
    """SFT: NLL of the real responses; no reference, no generation."""

    name = "sft"
    supervised = True

    def batch(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> dict[str, torch.Tensor]:
        pairs = list(zip(inputs["prompt_ids"], inputs["response_ids"], strict=True))
        return pad_sequences(pairs, self.services.pad_token_id)


class OfflinePairs(Recipe):
    """DPO on the data's own chosen/rejected pairs, against the fixed starting model."""

    name = "dpo"
    needs_rejected_data = True
    allowed_loss_types = REFERENCE_LOSS_TYPES
    fixed_reference = True

    def pairs(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> list[ReplayEntry]:
        return [ReplayEntry(list(p), list(y), list(r), 0, len(r))
                for p, y, r in zip(inputs["prompt_ids"], inputs["response_ids"], inputs["rejected_ids"], strict=True)]


class OfflineORPO(OfflinePairs):
    """ORPO on the data's own pairs (no reference)."""

    name = "orpo"
    fixed_loss_type = "orpo"
    allowed_loss_types = None


class SelfAugmented(Recipe):
    """SAPO: the EMA model rewrites a segment of each incoming real response into a rejected one (SPEC §1 step 2);
    the triples go into a FIFO replay buffer, from which each step draws its pairs (step 3)."""

    name = "sapo"
    needs_ema = True

    def __init__(self, args: Any, services: StepServices, seed: int) -> None:
        super().__init__(args, services, seed)
        self.buffer = ReplayBuffer(args.max_replay_buffer_size, seed=seed)
        self.segment_rng = random.Random(seed)
        self.pending: list[Pending] = []  # examples queued for the next generation round
        self.dropped = 0  # rewrites that carried no signal and never entered the buffer (identical_rejected)
        self.epoch_batches: int | None = None  # batches this process sees per epoch, once training knows it
        self.epoch_position = 0  # batches of the current epoch seen so far

    def set_epoch_length(self, batches: int) -> None:
        self.epoch_batches = batches

    @property
    def round_size(self) -> int:
        """Examples per generation round: `SAPOConfig.generation_round_size`, capped so a short dataset still has
        several rounds per epoch: at most a quarter of the examples this process sees in an epoch, in whole
        batches, at least one batch (and what is pending at an epoch's last batch is generated then)."""
        size = self.args.generation_round_size
        if self.epoch_batches is None:
            return size
        batch = self.args.per_device_train_batch_size
        return min(size, max(batch, self.epoch_batches * batch // 4 // batch * batch))

    def pairs(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> list[ReplayEntry]:
        if step % self.args.sample_every_n_steps == 0:
            self._queue_for_augmentation(inputs)
        self.epoch_position += 1
        if self.epoch_batches is not None and self.epoch_position >= self.epoch_batches:  # the epoch's last batch
            self.epoch_position = 0
            if self.services.any_rank(bool(self.pending)):
                self.flush()
        self.services.record("buffer/size", float(len(self.buffer)))
        self.services.record("pairs/dropped", float(self.dropped))
        self.drew_nothing = len(self.buffer) == 0
        if self.drew_nothing:  # every rewrite so far was dropped: stand-in pairs, which train nothing
            return [ReplayEntry(list(p), list(y), list(y), 0, 0) for p, y in zip(
                inputs["prompt_ids"], inputs["response_ids"], strict=True)]
        replayed = self.buffer.sample(self.args.per_device_train_batch_size)
        self.services.record("buffer/mean_times_sampled", self.buffer.stats()["mean_times_sampled"])
        return replayed

    def _queue_for_augmentation(self, inputs: dict[str, list[Any]]) -> None:
        """Augment once a round's examples are waiting (`round_size`), or at once while the buffer is still empty.
        Every process decides together: generating from a sharded model is collective."""
        self.pending.extend(zip(inputs["prompt_ids"], inputs["response_ids"], inputs["index"], strict=True))
        if self.services.any_rank(len(self.pending) >= self.round_size or len(self.buffer) == 0):
            self.flush()

    def flush(self) -> None:
        """Generate the rejected responses of every pending example now (a round, or the end of an epoch, so that
        no example waits for a round its epoch never fills); every process must call it together."""
        pending, self.pending = self.pending, []
        prompts, responses, indices = ([list(column) for column in zip(*pending, strict=True)] if pending
                                       else ([], [], []))
        self.augment(prompts, responses, indices)

    def augment(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                indices: Sequence[int | None] | None = None) -> list[ReplayEntry]:
        """Make rejected responses for a batch of real ones and push those that carry signal to the buffer
        (`identical_rejected`: a rewrite equal to the real response, or not judged worse, is regenerated once at a
        new segment start, dropped, or kept as the paper keeps it)."""
        indices = list(indices) if indices is not None else [None] * len(prompts)
        rewrites = self._rewrite(prompts, responses, self.args.responses_per_prompt)
        for rewrite in rewrites:
            self.services.record("segment/identical_fraction", float(rewrite.rejected == responses[rewrite.example]))
        usable = self._usable(rewrites, responses, indices, record=True)
        mode = self.args.identical_rejected
        kept = [r for r, ok in zip(rewrites, usable, strict=True) if ok or mode == "keep"]
        retry = [r.example for r, ok in zip(rewrites, usable, strict=True) if not ok and mode == "resample"]
        if mode == "resample" and self.services.any_rank(bool(retry)):  # a sharded generator: all join
            again = [SegmentRewrite(retry[r.example], r.segment_start, r.rejected, r.replaced) for r in
                     self._rewrite([prompts[i] for i in retry], [responses[i] for i in retry], 1)]
            kept += [r for r, ok in zip(again, self._usable(again, responses, indices), strict=True) if ok]
        self.dropped += len(rewrites) - len(kept)
        entries = [ReplayEntry(list(prompts[r.example]), list(responses[r.example]), r.rejected, r.segment_start,
                               r.replaced) for r in kept]
        self.buffer.extend(entries)
        for entry in entries:
            self.services.record("segment/replaced_length", float(entry.segment_length))
            self.services.record("segment/start", float(entry.segment_start))
        return entries

    def _rewrite(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 samples: int) -> list[SegmentRewrite]:
        """`rewrite_segments` with the EMA model; a process with nothing to rewrite still joins the generation
        call (with no contexts), since another process's may be collective."""
        generate = partial(self.services.generate, EMA)
        if not prompts:
            generate([], 1)
            return []
        return rewrite_segments(prompts, responses, generate, token_generate_length=self.args.token_generate_length,
                                max_length=self.args.max_length, eos_token_ids=self.services.eos_token_ids,
                                rng=self.segment_rng, samples_per_example=samples)

    def _usable(self, rewrites: Sequence[SegmentRewrite], responses: Sequence[Sequence[int]],
                indices: Sequence[int | None], record: bool = False) -> list[bool]:
        """Which rewrites carry a preference signal: not identical to their real response and, with a
        `rejected_judge`, judged worse than it."""
        differs = [r.rejected != list(responses[r.example]) for r in rewrites]
        judge = self.services.judge_rewrites
        if judge is None:
            return differs
        judged = [r for r, d in zip(rewrites, differs, strict=True) if d]
        worse = iter(judge([indices[r.example] for r in judged], [list(responses[r.example]) for r in judged],
                           [r.rejected for r in judged]) if judged else [])
        usable = [d and next(worse) for d in differs]
        if record and judged:
            self.services.record("pairs/judged_not_worse", 1.0 - sum(usable) / len(judged))
        return usable

    def reference_refresh(self, step: int, period: int) -> str | None:
        mode = self.args.ref_update_mode
        return mode if mode != "fixed" and step % period == 0 else None

    def cached_reference_logps(self, entry_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [self.buffer.reference_logps(i) for i in entry_ids]

    def remember_reference_logps(self, entry_id: int, real: torch.Tensor, rejected: torch.Tensor) -> None:
        self.buffer.remember_reference_logps(entry_id, real, rejected)

    def reference_moved(self) -> None:
        self.buffer.forget_reference_logps()

    def state_files(self, rank: int) -> list[str]:
        return [segment_rng_file(rank), buffer_file(rank), pending_file(rank)]

    def save(self, directory: Path, rank: int) -> None:
        self.buffer.save(directory / buffer_file(rank))
        state = {"pending": self.pending, "dropped": self.dropped, "epoch_position": self.epoch_position}
        (directory / pending_file(rank)).write_text(json.dumps(state))
        (directory / segment_rng_file(rank)).write_text(json.dumps(rng_state_to_json(self.segment_rng)))

    def load(self, directory: Path, rank: int) -> None:
        self.buffer = ReplayBuffer.load(directory / buffer_file(rank))
        state = json.loads((directory / pending_file(rank)).read_text())
        if isinstance(state, list):  # saved before pairs were filtered: (prompt, response) pairs alone
            state = {"pending": [[*pair, None] for pair in state], "dropped": 0, "epoch_position": 0}
        self.pending = [tuple(entry) for entry in state["pending"]]
        self.dropped, self.epoch_position = state["dropped"], state["epoch_position"]
        self.segment_rng.setstate(rng_state_from_json(json.loads((directory / segment_rng_file(rank)).read_text())))


class SapoDPO(SelfAugmented):
    """SAPO with a reference loss (sigmoid by default)."""

    name = "sapo-dpo"
    allowed_loss_types = REFERENCE_LOSS_TYPES


class SapoORPO(SelfAugmented):
    """SAPO-ORPO: no reference model."""

    name = "sapo-orpo"
    fixed_loss_type = "orpo"


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
    allowed_loss_types = REFERENCE_LOSS_TYPES
    fixed_reference = True

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
        self.services.record("spin/iteration", float(iteration))
        self.services.record("spin/beta", float(self.beta))

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


RECIPES: dict[str, type[Recipe]] = {recipe.name: recipe for recipe in (
    SelfAugmented, SapoDPO, SapoORPO, Supervised, OfflinePairs, OfflineORPO, Spin)}
"""Every recipe by name; `SAPOConfig.recipe` is one of these."""
