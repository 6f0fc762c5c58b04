"""`SelfAugmented` (sapo, sapo-dpo, sapo-orpo): the EMA model rewrites one segment of each incoming real response;
the pairs go into a replay buffer, and the step trains on a draw from it (SPEC §1)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sapo import metrics as m
from sapo.buffer import ReplayBuffer, ReplayEntry
from sapo.copies import EMA  # which copy generates
from sapo.losses import REFERENCE_LOSS_TYPES
from sapo.recipes.base import Pending, Recipe, StepServices
from sapo.run.paths import buffer_file, pending_file, segment_rng_file
from sapo.run.resume import rng_state_from_json, rng_state_to_json
from sapo.segments import SegmentRewrite, rewrite_segments


class SelfAugmented(Recipe):
    """SAPO: the EMA model rewrites a segment of each incoming real response into a rejected one (SPEC §1 step 2);
    the triples go into a FIFO replay buffer, from which each step draws its pairs (step 3)."""

    name = "sapo"
    settings = ("token_generate_length", "ema_beta", "max_replay_buffer_size", "sample_every_n_steps",
                "responses_per_prompt", "generation_batch_size", "temperature", "top_k", "top_p", "identical_rejected",
                "rejected_judge")
    needs_ema = True
    eval_rejected = "segment"

    @classmethod
    def generation_rows(cls, args: Any) -> int:
        """Whole batches are queued until `generation_round_size` examples wait, so a round holds up to that rounded
        up to whole batches, times responses_per_prompt."""
        batch = args.per_device_train_batch_size
        return math.ceil(args.generation_round_size / batch) * batch * args.responses_per_prompt

    @classmethod
    def generation_cache_len(cls, args: Any) -> int:
        """Contexts prompt + y[:k] are left-padded to the longest (<= max_length) and get up to
        token_generate_length new tokens."""
        return args.max_length + args.token_generate_length

    @classmethod
    def reference_moves(cls, args: Any) -> bool:
        """A reference refreshed from the EMA model or the policy (ref_update_mode other than 'fixed')."""
        return args.ref_update_mode != "fixed"

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
        self.services.record(m.BUFFER_SIZE, float(len(self.buffer)))
        self.services.record(m.PAIRS_DROPPED, float(self.dropped))
        self.drew_nothing = len(self.buffer) == 0
        if self.drew_nothing:  # every rewrite so far was dropped: stand-in pairs, which train nothing
            return [ReplayEntry(list(p), list(y), list(y), 0, 0) for p, y in zip(
                inputs["prompt_ids"], inputs["response_ids"], strict=True)]
        replayed = self.buffer.sample(self.args.per_device_train_batch_size)
        self.services.record(m.BUFFER_MEAN_TIMES_SAMPLED, self.buffer.stats()["mean_times_sampled"])
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
            self.services.record(m.SEGMENT_IDENTICAL_FRACTION, float(rewrite.rejected == responses[rewrite.example]))
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
            self.services.record(m.SEGMENT_REPLACED_LENGTH, float(entry.segment_length))
            self.services.record(m.SEGMENT_START, float(entry.segment_start))
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
            self.services.record(m.PAIRS_JUDGED_NOT_WORSE, 1.0 - sum(usable) / len(judged))
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
