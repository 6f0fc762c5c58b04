"""FIFO replay buffer of SAPO preference triples with count-weighted sampling.

SAPO mixes freshly generated rejected responses with older ones.  Entries that have been
trained on often are down-weighted (``p_i ∝ 1 / (1 + times_sampled_i)``) so the buffer does
not overfit a few examples, and the oldest entries are evicted first so stale negatives
from an earlier policy fade out.

Counts, segment starts and segment lengths live in numpy arrays laid out as a ring aligned
with the entry slots, so sampling is vectorised even for tens of thousands of entries.  The
``ReplayEntry.times_sampled`` field is only a snapshot: the numpy counts are the truth and
are copied into the entries returned by :meth:`ReplayBuffer.entries` and
:meth:`ReplayBuffer.sample`.

Each entry also gets an id (consecutive in insertion order) under which the trainer can remember
what the reference model scored for it: the reference only moves at its refreshes, so an entry
drawn again before the next refresh needs no second reference forward.  The scores are dropped
with the entry, or all at once by :meth:`ReplayBuffer.forget_reference_logps` when the
reference moves, and saved with the buffer so a resumed run reuses exactly the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

__all__ = ["ReplayBuffer", "ReplayEntry"]

_FORMAT = "sapo.replay_buffer"
_VERSION = "2"  # 2: entry ids and cached reference log-probs (version 1 files load with neither)
_VERSIONS = ("1", _VERSION)
_TOKEN_FIELDS = ("prompt", "real", "rejected")
# Bit generators we are willing to rebuild from a saved state; avoids getattr on arbitrary names.
_BIT_GENERATORS = {
    "PCG64": np.random.PCG64,
    "PCG64DXSM": np.random.PCG64DXSM,
    "Philox": np.random.Philox,
    "SFC64": np.random.SFC64,
    "MT19937": np.random.MT19937,
}


@dataclass
class ReplayEntry:
    """One (prompt, chosen, rejected) triple plus where the rejected one diverges."""

    prompt: list[int]
    real: list[int]
    rejected: list[int]
    segment_start: int
    segment_length: int
    times_sampled: int = 0
    # Snapshot fields, set by the buffer and left out of equality (like times_sampled, the buffer holds the truth):
    entry_id: int = field(default=-1, compare=False)
    # The reference's per-token log-probs of the real and the rejected response, while they are valid.
    reference_logps: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, compare=False, repr=False)


class ReplayBuffer:
    """Bounded FIFO of :class:`ReplayEntry` sampled with replacement, favouring rarely seen entries."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._reset(capacity)

    def _reset(self, capacity: int) -> None:
        self._capacity = capacity
        self._slots: list[ReplayEntry | None] = [None] * capacity
        self._counts = np.zeros(capacity, dtype=np.int64)
        self._seg_start = np.zeros(capacity, dtype=np.int64)
        self._seg_len = np.zeros(capacity, dtype=np.int64)
        self._reference: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * capacity
        self._head = 0  # physical slot of the oldest entry
        self._size = 0
        self._next_id = 0  # the id the next added entry gets; the live ones are the _size ids before it

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return self._size

    def _order(self) -> np.ndarray:
        """Physical slot indices, oldest first, so callers never see the ring rotation."""
        return (self._head + np.arange(self._size)) % self._capacity

    def add(self, entry: ReplayEntry) -> None:
        """Append ``entry``; its ``times_sampled`` seeds the count. Evicts the oldest when full."""
        if entry.times_sampled < 0:
            raise ValueError(f"entry.times_sampled must be >= 0, got {entry.times_sampled}")
        if self._size < self._capacity:
            slot = (self._head + self._size) % self._capacity
            self._size += 1
        else:
            slot = self._head
            self._head = (self._head + 1) % self._capacity
        self._slots[slot] = entry
        self._counts[slot] = entry.times_sampled
        self._seg_start[slot] = entry.segment_start
        self._seg_len[slot] = entry.segment_length
        self._reference[slot] = entry.reference_logps
        self._next_id += 1

    def extend(self, entries: Iterable[ReplayEntry]) -> None:
        for entry in entries:
            self.add(entry)

    def _snapshot(self, slot: int) -> ReplayEntry:
        """Shallow copy with the live count, id and reference scores, so callers cannot desynchronise them."""
        entry = self._slots[slot]
        assert entry is not None
        return dataclasses.replace(entry, times_sampled=int(self._counts[slot]), entry_id=self._id_of(slot),
                                   reference_logps=self._reference[slot])

    def _id_of(self, slot: int) -> int:
        return self._next_id - self._size + (slot - self._head) % self._capacity

    def _slot_of(self, entry_id: int) -> int | None:
        """The slot that holds entry `entry_id`, or None once it has been evicted (or was never added)."""
        age = entry_id - (self._next_id - self._size)
        return (self._head + age) % self._capacity if 0 <= age < self._size else None

    def remember_reference_logps(self, entry_id: int, real: torch.Tensor, rejected: torch.Tensor) -> None:
        """Keep the reference's per-token log-probs of entry `entry_id`'s real and rejected response (one value
        per token of each), returned with the entry until it is evicted or `forget_reference_logps` is called.
        An evicted entry's scores are dropped."""
        slot = self._slot_of(entry_id)
        if slot is None:
            return
        entry = self._slots[slot]
        assert entry is not None
        if real.shape != (len(entry.real),) or rejected.shape != (len(entry.rejected),):
            raise ValueError(f"entry {entry_id}: reference log-probs of shapes {tuple(real.shape)} and "
                             f"{tuple(rejected.shape)} for responses of {len(entry.real)} and {len(entry.rejected)} "
                             "tokens")
        self._reference[slot] = (real, rejected)

    def reference_logps(self, entry_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The scores remembered for entry `entry_id` (None: none, or the entry is gone)."""
        slot = self._slot_of(entry_id)
        return None if slot is None else self._reference[slot]

    def forget_reference_logps(self) -> None:
        """Drop every remembered reference score (the reference has moved)."""
        self._reference = [None] * self._capacity

    def entries(self) -> list[ReplayEntry]:
        """Shallow copies, oldest first; token lists are shared with the buffer and must not be mutated."""
        return [self._snapshot(int(slot)) for slot in self._order()]

    def sampling_probabilities(self) -> np.ndarray:
        """``p_i ∝ 1/(1+times_sampled_i)``, oldest first; empty array for an empty buffer."""
        weights = 1.0 / (1.0 + self._counts[self._order()])
        if weights.size == 0:
            return weights
        return weights / weights.sum()

    def sample(self, n: int) -> list[ReplayEntry]:
        """Draw ``n`` entries with replacement, then bump each drawn entry's count once per draw.

        All ``n`` draws use the probabilities from *before* the call.  The returned entries are
        shallow copies whose ``times_sampled`` is the count *after* the increment (an entry
        drawn twice appears twice, both copies showing the +2 count).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self._size == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer; add entries first")
        logical = self._rng.choice(self._size, size=n, replace=True, p=self.sampling_probabilities())
        slots = (self._head + logical) % self._capacity
        np.add.at(self._counts, slots, 1)
        return [self._snapshot(int(slot)) for slot in slots]

    def stats(self) -> dict[str, float]:
        """Cheap health numbers for logging (all zeros apart from capacity when empty)."""
        order = self._order()
        counts = self._counts[order]
        seg_len = self._seg_len[order]
        empty = self._size == 0
        return {
            "size": float(self._size),
            "capacity": float(self._capacity),
            "fill_fraction": self._size / self._capacity,
            "mean_times_sampled": 0.0 if empty else float(counts.mean()),
            "max_times_sampled": 0.0 if empty else float(counts.max()),
            "mean_segment_length": 0.0 if empty else float(seg_len.mean()),
        }

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Pickle-free state: int64 tensors (oldest first) plus string metadata with the RNG state."""
        order = self._order()
        live = [self._slots[int(slot)] for slot in order]
        tensors: dict[str, torch.Tensor] = {
            "capacity": torch.tensor([self._capacity], dtype=torch.int64),
            "times_sampled": torch.from_numpy(self._counts[order].copy()),
            "segment_start": torch.from_numpy(self._seg_start[order].copy()),
            "segment_length": torch.from_numpy(self._seg_len[order].copy()),
        }
        for name in _TOKEN_FIELDS:
            flat, offsets = _flatten([getattr(e, name) for e in live])
            tensors[f"{name}_tokens"] = torch.from_numpy(flat)
            tensors[f"{name}_offsets"] = torch.from_numpy(offsets)
        tensors.update(self._reference_state(order))
        metadata = {
            "format": _FORMAT,
            "version": _VERSION,
            "seed": str(self._seed),
            "rng_state": json.dumps(self._rng.bit_generator.state),
            "next_id": str(self._next_id),
        }
        return tensors, metadata

    def _reference_state(self, order: np.ndarray) -> dict[str, torch.Tensor]:
        """Which entries (oldest first) have reference scores, and the scores of those, concatenated in fp32."""
        scored = [self._reference[int(slot)] for slot in order]
        present = torch.tensor([pair is not None for pair in scored], dtype=torch.int64)
        kept = [pair for pair in scored if pair is not None]
        state = {"reference_present": present}
        for index, name in enumerate(("real", "rejected")):
            pieces = [pair[index].detach().float().cpu() for pair in kept]
            state[f"reference_{name}_logps"] = torch.cat(pieces) if pieces else torch.zeros(0)
        return state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Replace the whole state (capacity included) so sampling resumes exactly where it stopped."""
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"not a replay buffer state (format={metadata.get('format')!r})")
        if metadata.get("version") not in _VERSIONS:
            raise ValueError(f"unsupported replay buffer state version {metadata.get('version')!r}")
        capacity = int(_as_numpy(tensors, "capacity")[0])
        counts = _as_numpy(tensors, "times_sampled")
        seg_start = _as_numpy(tensors, "segment_start")
        seg_len = _as_numpy(tensors, "segment_length")
        size = counts.shape[0]
        if capacity < 1 or size > capacity:
            raise ValueError(f"inconsistent state: size {size} with capacity {capacity}")
        if seg_start.shape[0] != size or seg_len.shape[0] != size:
            raise ValueError("inconsistent state: per-entry arrays have different lengths")
        fields = {f: _unflatten(tensors, f, size) for f in _TOKEN_FIELDS}
        reference = _reference_scores(tensors, fields["real"], fields["rejected"])
        if "rng_state" not in metadata:
            raise ValueError("replay buffer state is missing the 'rng_state' metadata")
        rng = _restore_rng(metadata["rng_state"])
        next_id = int(metadata.get("next_id", str(size)))
        if next_id < size:
            raise ValueError(f"inconsistent state: next entry id {next_id} below the {size} entries held")

        self._reset(capacity)
        self._seed = int(metadata.get("seed", "0"))
        self._rng = rng
        self._next_id = next_id - size  # the entries below get the ids they had
        for i in range(size):
            self.add(
                ReplayEntry(
                    prompt=fields["prompt"][i],
                    real=fields["real"][i],
                    rejected=fields["rejected"][i],
                    segment_start=int(seg_start[i]),
                    segment_length=int(seg_len[i]),
                    times_sampled=int(counts[i]),
                    reference_logps=reference[i],
                )
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one .safetensors file atomically: a crash leaves either the old file or the new one."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tensors, metadata = self.state_dict()
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReplayBuffer:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        buffer = cls(capacity=1)
        buffer.load_state_dict(tensors, metadata)
        return buffer


def _flatten(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> (flat int64 tokens, int64 offsets of length len(seqs)+1)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def _as_numpy(tensors: dict[str, torch.Tensor], key: str) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"replay buffer state is missing tensor {key!r}")
    return tensors[key].detach().cpu().to(torch.int64).numpy()


def _unflatten(tensors: dict[str, torch.Tensor], field: str, size: int) -> list[list[int]]:
    flat = _as_numpy(tensors, f"{field}_tokens").tolist()
    offsets = _as_numpy(tensors, f"{field}_offsets").tolist()
    if len(offsets) != size + 1 or offsets[0] != 0 or offsets[-1] != len(flat):
        raise ValueError(f"inconsistent state: bad offsets for {field!r}")
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _reference_scores(tensors: dict[str, torch.Tensor], real: list[list[int]],
                      rejected: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per entry, the saved reference log-probs (split by the responses' lengths), or None; version 1 has none."""
    if "reference_present" not in tensors:
        return [None] * len(real)
    present = _as_numpy(tensors, "reference_present").astype(bool)
    if present.shape[0] != len(real):
        raise ValueError("inconsistent state: reference_present has a different length than the entries")
    scores: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(real)
    splits = []
    for name, responses in (("real", real), ("rejected", rejected)):
        key = f"reference_{name}_logps"
        if key not in tensors:
            raise ValueError(f"replay buffer state is missing tensor {key!r}")
        lengths = [len(responses[i]) for i in np.flatnonzero(present)]
        if tensors[key].numel() != sum(lengths):
            raise ValueError(f"inconsistent state: {key} holds {tensors[key].numel()} values for {sum(lengths)} "
                             "tokens")
        splits.append(torch.split(tensors[key].float(), lengths))
    for i, pair in zip(np.flatnonzero(present), zip(*splits, strict=True), strict=True):
        scores[int(i)] = (pair[0].clone(), pair[1].clone())
    return scores


def _restore_rng(state_json: str) -> np.random.Generator:
    state = json.loads(state_json)
    name = state.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise ValueError(f"unsupported bit generator in replay buffer state: {name!r}")
    bit_generator = _BIT_GENERATORS[name]()
    bit_generator.state = state
    return np.random.Generator(bit_generator)
