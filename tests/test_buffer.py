"""Tests for the FIFO replay buffer: eviction, count-weighted sampling and exact resumption."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from sapo.buffer import ReplayBuffer, ReplayEntry


def make_entry(i: int, times_sampled: int = 0) -> ReplayEntry:
    """Entry whose token lists encode ``i`` so identity survives copies and serialisation."""
    return ReplayEntry(
        prompt=[i, i + 1],
        real=[100 + i] * (i % 4 + 1),
        rejected=[200 + i] * (i % 3),
        segment_start=i % 5,
        segment_length=i % 7 + 1,
        times_sampled=times_sampled,
    )


def ids(entries: list[ReplayEntry]) -> list[int]:
    return [e.prompt[0] for e in entries]


def counts(buf: ReplayBuffer) -> list[int]:
    return [e.times_sampled for e in buf.entries()]


# ----------------------------------------------------------------- construction and FIFO


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    buf = ReplayBuffer(3)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    buf.add(make_entry(0))
    with pytest.raises(ValueError, match="n must be >= 1"):
        buf.sample(0)
    with pytest.raises(ValueError, match="times_sampled"):
        buf.add(make_entry(1, times_sampled=-1))


def test_fifo_eviction_order() -> None:
    buf = ReplayBuffer(3)
    assert buf.capacity == 3
    buf.extend(make_entry(i) for i in range(2))
    assert len(buf) == 2
    assert ids(buf.entries()) == [0, 1]
    buf.extend(make_entry(i) for i in range(2, 7))
    assert len(buf) == 3
    assert ids(buf.entries()) == [4, 5, 6]


def test_eviction_drops_count_of_evicted_entry() -> None:
    buf = ReplayBuffer(2)
    buf.extend([make_entry(0, times_sampled=5), make_entry(1, times_sampled=1)])
    buf.add(make_entry(2))
    assert ids(buf.entries()) == [1, 2]
    assert counts(buf) == [1, 0]
    np.testing.assert_allclose(buf.sampling_probabilities(), np.array([0.5, 1.0]) / 1.5)


def test_entries_are_snapshots() -> None:
    buf = ReplayBuffer(2)
    buf.add(make_entry(0))
    buf.entries()[0].times_sampled = 99
    assert counts(buf) == [0]


# ----------------------------------------------------------------- sampling probabilities


def test_initial_probabilities_use_entry_counts() -> None:
    buf = ReplayBuffer(5)
    buf.extend(make_entry(i, times_sampled=c) for i, c in enumerate([0, 1, 3]))
    np.testing.assert_allclose(buf.sampling_probabilities(), [4 / 7, 2 / 7, 1 / 7])
    assert ReplayBuffer(2).sampling_probabilities().shape == (0,)


def test_probabilities_exact_after_known_draws() -> None:
    buf = ReplayBuffer(4, seed=3)
    buf.extend(make_entry(i) for i in range(4))
    drawn = ids(buf.sample(10))
    expected = [drawn.count(i) for i in range(4)]
    assert counts(buf) == expected
    assert sum(expected) == 10
    weights = 1.0 / (1.0 + np.array(expected, dtype=float))
    np.testing.assert_allclose(buf.sampling_probabilities(), weights / weights.sum(), rtol=0, atol=1e-15)


def test_duplicate_draws_increment_once_per_draw() -> None:
    buf = ReplayBuffer(3)
    buf.add(make_entry(0))
    drawn = buf.sample(5)
    assert ids(drawn) == [0] * 5
    assert [e.times_sampled for e in drawn] == [5] * 5  # copies reflect the count after the increment
    assert counts(buf) == [5]


def test_counts_follow_ring_after_wraparound() -> None:
    buf = ReplayBuffer(3, seed=11)
    buf.extend(make_entry(i) for i in range(5))  # ring head is no longer at slot 0
    drawn = ids(buf.sample(50))
    assert counts(buf) == [drawn.count(i) for i in (2, 3, 4)]
    for entry in buf.entries():
        assert entry.prompt == [entry.prompt[0], entry.prompt[0] + 1]


def test_empirical_frequencies_match_probabilities() -> None:
    buf = ReplayBuffer(4, seed=0)
    buf.extend(make_entry(i, times_sampled=c) for i, c in enumerate([0, 1, 3, 0]))
    p = buf.sampling_probabilities()
    n = 40_000
    drawn = np.array(ids(buf.sample(n)))  # one call: every draw uses the pre-call probabilities
    observed = np.bincount(drawn, minlength=4)
    expected = n * p
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 21  # 3 dof: p(chi2 > 21) ~ 1e-4
    assert counts(buf) == [c + int(o) for c, o in zip([0, 1, 3, 0], observed, strict=True)]


def test_first_draw_distribution_over_seeds() -> None:
    hits = np.zeros(3)
    seeds = 3000
    for seed in range(seeds):
        buf = ReplayBuffer(3, seed=seed)
        buf.extend(make_entry(i, times_sampled=c) for i, c in enumerate([0, 1, 3]))
        hits[buf.sample(1)[0].prompt[0]] += 1
    expected = seeds * np.array([4 / 7, 2 / 7, 1 / 7])
    assert float(((hits - expected) ** 2 / expected).sum()) < 18  # 2 dof: p ~ 1e-4


def test_seeded_determinism() -> None:
    a, b, c = ReplayBuffer(8, seed=42), ReplayBuffer(8, seed=42), ReplayBuffer(8, seed=43)
    for buf in (a, b, c):
        buf.extend(make_entry(i) for i in range(8))
    draws_a = [ids(a.sample(3)) for _ in range(20)]
    draws_b = [ids(b.sample(3)) for _ in range(20)]
    draws_c = [ids(c.sample(3)) for _ in range(20)]
    assert draws_a == draws_b
    assert draws_a != draws_c
    assert counts(a) == counts(b)


def test_stats() -> None:
    buf = ReplayBuffer(4)
    assert buf.stats()["size"] == 0.0
    assert buf.stats()["mean_times_sampled"] == 0.0
    buf.extend(make_entry(i, times_sampled=c) for i, c in zip([0, 1, 2], [0, 2, 4], strict=True))
    stats = buf.stats()
    assert stats["size"] == 3.0
    assert stats["capacity"] == 4.0
    assert stats["fill_fraction"] == pytest.approx(0.75)
    assert stats["mean_times_sampled"] == pytest.approx(2.0)
    assert stats["max_times_sampled"] == 4.0
    assert stats["mean_segment_length"] == pytest.approx((1 + 2 + 3) / 3)


def test_large_capacity_is_fast() -> None:
    buf = ReplayBuffer(50_000, seed=1)
    buf.extend(make_entry(i % 1000) for i in range(60_000))
    assert len(buf) == 50_000
    for _ in range(200):
        buf.sample(64)
    assert buf.stats()["mean_times_sampled"] == pytest.approx(200 * 64 / 50_000)


# ----------------------------------------------------------------- persistence


def filled_buffer(seed: int = 9) -> ReplayBuffer:
    buf = ReplayBuffer(6, seed=seed)
    buf.extend(make_entry(i) for i in range(9))  # wrapped ring
    buf.sample(7)
    return buf


def test_state_dict_is_plain_tensors_and_strings() -> None:
    tensors, metadata = filled_buffer().state_dict()
    assert all(isinstance(v, str) for v in metadata.values())
    assert int(tensors["capacity"][0]) == 6
    assert tensors["prompt_offsets"].tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert tensors["prompt_tokens"][:2].tolist() == [3, 4]


def test_save_load_resumes_identically(tmp_path: Path) -> None:
    original = filled_buffer()
    path = tmp_path / "buffer.safetensors"
    original.save(path)
    restored = ReplayBuffer.load(path)

    assert restored.capacity == original.capacity
    assert restored.entries() == original.entries()
    np.testing.assert_array_equal(restored.sampling_probabilities(), original.sampling_probabilities())
    for _ in range(10):
        assert restored.sample(4) == original.sample(4)
    restored.add(make_entry(50))
    original.add(make_entry(50))
    assert restored.entries() == original.entries()
    assert restored.sample(5) == original.sample(5)


def test_load_state_dict_in_memory_round_trip() -> None:
    original = filled_buffer()
    other = ReplayBuffer(2, seed=0)
    other.load_state_dict(*original.state_dict())
    assert other.capacity == 6
    assert ids(other.sample(20)) == ids(original.sample(20))


def test_empty_buffer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    ReplayBuffer(3, seed=4).save(path)
    restored = ReplayBuffer.load(path)
    assert len(restored) == 0
    assert restored.capacity == 3
    restored.add(make_entry(1))
    fresh = ReplayBuffer(3, seed=4)
    fresh.add(make_entry(1))
    assert restored.sample(3) == fresh.sample(3)


def test_save_leaves_no_temp_file_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "buffer.safetensors"
    ReplayBuffer(2).save(path)
    filled_buffer().save(path)
    assert os.listdir(tmp_path) == ["buffer.safetensors"]
    assert len(ReplayBuffer.load(path)) == 6


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buffer.safetensors"
    filled_buffer().save(path)
    before = path.read_bytes()
    real_save = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"half")  # simulate a partial write before dying
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    other = ReplayBuffer(2)
    other.add(make_entry(0))
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["buffer.safetensors"]
    assert len(ReplayBuffer.load(path)) == 6


def test_load_rejects_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    tensors, _ = filled_buffer().state_dict()
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format"):
        ReplayBuffer.load(path)


def test_load_state_dict_rejects_inconsistent_offsets() -> None:
    tensors, metadata = filled_buffer().state_dict()
    tensors["real_offsets"] = tensors["real_offsets"][:-1]
    buf = ReplayBuffer(1)
    with pytest.raises(ValueError, match="real"):
        buf.load_state_dict(tensors, metadata)


# ----------------------------------------------------------------- remembered reference scores


def scores_for(entry: ReplayEntry, offset: float = 0.0):
    real = torch.arange(len(entry.real), dtype=torch.float32) * -0.5 - offset
    rejected = torch.arange(len(entry.rejected), dtype=torch.float32) * -0.25 - offset
    return real, rejected


def test_entry_ids_follow_insertion_and_survive_eviction() -> None:
    buf = ReplayBuffer(capacity=3, seed=0)
    buf.extend(make_entry(i) for i in range(5))  # 0 and 1 evicted
    assert [e.entry_id for e in buf.entries()] == [2, 3, 4]
    assert ids(buf.entries()) == [2, 3, 4]
    drawn = buf.sample(20)
    assert all(e.prompt[0] == e.entry_id for e in drawn)  # make_entry(i) went in as the i-th entry


def test_reference_scores_are_returned_until_evicted_or_forgotten() -> None:
    buf = ReplayBuffer(capacity=3, seed=0)
    buf.extend(make_entry(i) for i in range(3))
    entry = buf.entries()[1]
    real, rejected = scores_for(entry)
    buf.remember_reference_logps(entry.entry_id, real, rejected)
    kept = {e.entry_id: e.reference_logps for e in buf.sample(30)}
    assert kept[1] is not None and torch.equal(kept[1][0], real) and torch.equal(kept[1][1], rejected)
    assert kept[0] is None and kept[2] is None
    assert entry.reference_logps is None  # snapshots taken before are not changed
    buf.forget_reference_logps()
    assert all(e.reference_logps is None for e in buf.entries())
    buf.remember_reference_logps(1, real, rejected)
    buf.extend(make_entry(i) for i in range(3, 5))  # evicts entries 0 and 1
    assert [e.reference_logps for e in buf.entries()] == [None] * 3
    buf.remember_reference_logps(0, real, rejected)  # an evicted id is ignored
    assert [e.reference_logps for e in buf.entries()] == [None] * 3
    with pytest.raises(ValueError, match="entry 4: reference log-probs of shapes"):
        buf.remember_reference_logps(4, real, rejected)  # entry 4 has other response lengths


def test_reference_scores_and_ids_round_trip(tmp_path: Path) -> None:
    buf = ReplayBuffer(capacity=4, seed=1)
    buf.extend(make_entry(i) for i in range(6))
    for entry in buf.entries()[::2]:
        buf.remember_reference_logps(entry.entry_id, *scores_for(entry, offset=entry.entry_id))
    buf.save(tmp_path / "b.safetensors")
    loaded = ReplayBuffer.load(tmp_path / "b.safetensors")
    before, after = buf.entries(), loaded.entries()
    assert [e.entry_id for e in after] == [e.entry_id for e in before] == [2, 3, 4, 5]
    for a, b in zip(before, after, strict=True):
        assert (a.reference_logps is None) == (b.reference_logps is None)
        if a.reference_logps is not None:
            assert all(torch.equal(x, y) for x, y in zip(a.reference_logps, b.reference_logps, strict=True))
    loaded.add(make_entry(6))
    assert loaded.entries()[-1].entry_id == 6


def test_version_1_state_loads_without_ids_or_scores() -> None:
    buf = ReplayBuffer(capacity=4, seed=1)
    buf.extend(make_entry(i) for i in range(3))
    tensors, metadata = buf.state_dict()
    old_tensors = {k: v for k, v in tensors.items() if not k.startswith("reference_")}
    old_metadata = {k: v for k, v in metadata.items() if k != "next_id"} | {"version": "1"}
    loaded = ReplayBuffer(capacity=1)
    loaded.load_state_dict(old_tensors, old_metadata)
    assert loaded.entries() == buf.entries()
    assert [e.entry_id for e in loaded.entries()] == [0, 1, 2]
    assert all(e.reference_logps is None for e in loaded.entries())
