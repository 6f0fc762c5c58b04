"""Tests for the segment arithmetic that decides what the EMA model rewrites."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sapo.segments import generation_length, sample_truncation_point, splice_rejected, truncation_bound

EOS = 2
RESPONSE = [10, 11, 12, 13, 14, 15, 16, 17, 18, EOS]


# ----------------------------------------------------------------- generation_length


@pytest.mark.parametrize(
    ("response_length", "tgl", "expected"),
    [(10, 4, 4), (4, 4, 4), (3, 4, 3), (0, 4, 0), (1, 64, 1)],
)
def test_generation_length_is_min(response_length: int, tgl: int, expected: int) -> None:
    assert generation_length(response_length, tgl) == expected


def test_generation_length_validation() -> None:
    with pytest.raises(ValueError, match="response_length"):
        generation_length(-1, 4)
    with pytest.raises(ValueError, match="token_generate_length"):
        generation_length(5, 0)


# ----------------------------------------------------------------- truncation_bound


def test_truncation_bound_tail_limited() -> None:
    # len(y) - 3 - G = 20 - 3 - 4 = 13; room = 1000 - 5 - 4 is large.
    assert truncation_bound(5, 20, 4, 1000) == 13


def test_truncation_bound_room_limited() -> None:
    # room = 30 - 20 - 4 = 6 < 20 - 3 - 4 = 13.
    assert truncation_bound(20, 20, 4, 30) == 6


def test_truncation_bound_can_be_negative() -> None:
    assert truncation_bound(0, 4, 4, 100) == -3
    assert truncation_bound(50, 20, 4, 40) == -14


def test_truncation_bound_validation() -> None:
    for kwargs, name in [
        ({"prompt_length": -1}, "prompt_length"),
        ({"response_length": -1}, "response_length"),
        ({"generation_length": -1}, "generation_length"),
        ({"max_length": -1}, "max_length"),
        ({"generation_length": 21}, "generation_length"),
    ]:
        args = {"prompt_length": 5, "response_length": 20, "generation_length": 4, "max_length": 100}
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            truncation_bound(**args)


# ----------------------------------------------------------------- sample_truncation_point


class CountingRandom(random.Random):
    """Records randint calls so tests can prove the stream is (not) consumed."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.calls: list[tuple[int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.calls.append((a, b))
        return super().randint(a, b)


@pytest.mark.parametrize("response_length", [0, 1, 2, 3, 4])
def test_short_responses_force_k_zero(response_length: int) -> None:
    rng = CountingRandom()
    k, g = sample_truncation_point(5, response_length, 64, 1000, rng)
    assert (k, g) == (0, response_length)
    assert rng.calls == []


def test_bound_exactly_zero_forces_k_zero_without_consuming_rng() -> None:
    # len(y) - 3 - G = 7 - 3 - 4 = 0.
    assert truncation_bound(5, 7, 4, 1000) == 0
    rng = CountingRandom(123)
    reference = random.Random(123)
    assert sample_truncation_point(5, 7, 4, 1000, rng) == (0, 4)
    assert rng.calls == []
    assert rng.random() == reference.random()


def test_negative_bound_from_max_length_forces_k_zero() -> None:
    rng = CountingRandom()
    assert sample_truncation_point(100, 50, 8, 90, rng) == (0, 8)
    assert rng.calls == []


def test_bound_one_uses_rng() -> None:
    rng = CountingRandom()
    k, g = sample_truncation_point(5, 8, 4, 1000, rng)
    assert g == 4
    assert rng.calls == [(0, 1)]
    assert k in (0, 1)


def test_max_length_bounds_k_and_distribution_is_uniform() -> None:
    prompt_len, resp_len, tgl, max_length = 30, 100, 8, 50
    bound = truncation_bound(prompt_len, resp_len, generation_length(resp_len, tgl), max_length)
    assert bound == 12  # room-limited: 50 - 30 - 8
    rng = random.Random(0)
    draws = 13_000
    counts: Counter[int] = Counter()
    for _ in range(draws):
        k, g = sample_truncation_point(prompt_len, resp_len, tgl, max_length, rng)
        assert g == 8
        assert 0 <= k <= bound
        assert prompt_len + k + g <= max_length
        counts[k] += 1
    assert set(counts) == set(range(bound + 1))
    expected = draws / (bound + 1)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 40  # 12 dof: p(chi2 > 40) ~ 7e-5


def test_tail_margin_respected() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        k, g = sample_truncation_point(0, 12, 4, 10_000, rng)
        assert k + g <= 12 - 3


def test_sample_truncation_point_validation() -> None:
    with pytest.raises(ValueError, match="token_generate_length"):
        sample_truncation_point(5, 10, 0, 100, random.Random(0))
    with pytest.raises(ValueError, match="prompt_length"):
        sample_truncation_point(-5, 10, 4, 100, random.Random(0))


# ----------------------------------------------------------------- splice_rejected


def test_no_eos_splices_real_suffix() -> None:
    rejected, kept = splice_rejected(RESPONSE, 3, [90, 91, 92], 3, {EOS})
    assert rejected == [10, 11, 12, 90, 91, 92, 16, 17, 18, EOS]
    assert kept == 3
    assert len(rejected) == len(RESPONSE)


def test_eos_cuts_after_first_eos() -> None:
    rejected, kept = splice_rejected(RESPONSE, 3, [90, EOS, 92, 93], 4, {EOS})
    assert rejected == [10, 11, 12, 90, EOS]
    assert kept == 2


def test_eos_at_first_position() -> None:
    rejected, kept = splice_rejected(RESPONSE, 4, [EOS, 91, 92], 3, {EOS})
    assert rejected == [10, 11, 12, 13, EOS]
    assert kept == 1


def test_two_eos_cut_at_first_of_either_id() -> None:
    rejected, kept = splice_rejected(RESPONSE, 2, [90, 7, 91, EOS], 4, {EOS, 7})
    assert rejected == [10, 11, 90, 7]
    assert kept == 2
    rejected, kept = splice_rejected(RESPONSE, 2, [90, EOS, EOS, 91], 4, [EOS])
    assert rejected == [10, 11, 90, EOS]
    assert kept == 2


def test_generated_longer_than_g_is_truncated() -> None:
    rejected, kept = splice_rejected(RESPONSE, 1, [90, 91, 92, 93, 94], 2, {EOS})
    assert rejected == [10, 90, 91, 13, 14, 15, 16, 17, 18, EOS]
    assert kept == 2


def test_eos_beyond_g_is_ignored() -> None:
    rejected, kept = splice_rejected(RESPONSE, 1, [90, 91, EOS, 0, 0], 2, {EOS})
    assert rejected == [10, 90, 91, 13, 14, 15, 16, 17, 18, EOS]
    assert kept == 2


def test_k_zero_whole_response_regenerated() -> None:
    rejected, kept = splice_rejected([10, 11, EOS], 0, [90, 91, 92], 3, {EOS})
    assert rejected == [90, 91, 92]
    assert kept == 3
    rejected, kept = splice_rejected([10, 11, 12, 13, EOS], 0, [90, 91], 2, {EOS})
    assert rejected == [90, 91, 12, 13, EOS]
    assert kept == 2


def test_empty_response_and_empty_eos_set() -> None:
    assert splice_rejected([], 0, [5, 6], 0, {EOS}) == ([], 0)
    rejected, kept = splice_rejected(RESPONSE, 0, [EOS, EOS], 2, set())
    assert rejected == [EOS, EOS] + RESPONSE[2:]
    assert kept == 2


def test_inputs_not_mutated_and_result_is_new_list() -> None:
    response = list(RESPONSE)
    generated = [90, 91]
    rejected, _ = splice_rejected(response, 0, generated, 2, {EOS})
    rejected.append(99)
    assert response == RESPONSE
    assert generated == [90, 91]


def test_short_generated_with_eos_is_fine_without_eos_is_error() -> None:
    assert splice_rejected(RESPONSE, 0, [90, EOS], 4, {EOS}) == ([90, EOS], 2)
    with pytest.raises(ValueError, match="generation_length"):
        splice_rejected(RESPONSE, 0, [90, 91], 4, {EOS})


@pytest.mark.parametrize(
    ("k", "g", "pattern"),
    [
        (-1, 2, "^k must be in"),
        (11, 0, "^k must be in"),
        (9, 2, r"k \+ generation_length"),
        (0, -1, "^generation_length must be >= 0"),
    ],
)
def test_splice_validation(k: int, g: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        splice_rejected(RESPONSE, k, [90, 91, 92], g, {EOS})


def test_end_to_end_with_sampled_point() -> None:
    rng = random.Random(7)
    prompt = [1, 1, 1]
    for _ in range(200):
        k, g = sample_truncation_point(len(prompt), len(RESPONSE), 3, 64, rng)
        generated = [100 + i for i in range(5)]
        rejected, kept = splice_rejected(RESPONSE, k, generated, g, {EOS})
        assert kept == g
        assert rejected[:k] == RESPONSE[:k]
        assert rejected[k : k + g] == generated[:g]
        assert rejected[k + g :] == RESPONSE[k + g :]
