"""Drawing from the top-k candidates only: the same distribution as the full-vocabulary path, ties included."""

import pytest
import torch

from sapo.generation import SamplingSettings, _categorical, filtered_logits, sample_from_logits, sampling_probabilities
from sapo.generation.topk_sampling import top_k_draw, top_k_probabilities


def tied_logits() -> torch.Tensor:
    """Rows with ties at the k-th value (k = 4): inside and outside topk's k, at the top, and none."""
    base = torch.full((5, 40), -4.0)
    base[0, [3, 9, 20]] = torch.tensor([2.0, 1.5, 1.0])
    base[0, [5, 11, 17, 30, 33]] = 0.5  # five tokens tie at the 4th value: topk keeps one, four are left out
    base[1, [1, 2, 3, 4, 5, 6, 7]] = 1.0  # the top value itself tied seven times
    base[2] = torch.linspace(-3.0, 3.0, 40)  # no ties
    base[3, [0, 39]] = 3.0
    base[3, [10, 12, 14, 16, 18, 20]] = 2.9  # two on top, six tied just below them
    base[4, :] = 0.0  # everything tied
    return base


CASES = [(4, 1.0), (4, 0.95), (4, 0.8), (4, 0.5), (4, 0.2), (7, 0.9), (1, 1.0), (2, 0.6)]


@pytest.mark.parametrize(("top_k", "top_p"), CASES)
def test_the_candidate_distribution_equals_the_full_vocabulary_path(top_k, top_p):
    settings = SamplingSettings(temperature=1.0, top_k=top_k, top_p=top_p)
    for logits in (tied_logits(), torch.randn(6, 300, generator=torch.Generator().manual_seed(top_k)) * 2):
        full = sampling_probabilities(logits, settings)
        ours = top_k_probabilities(logits, top_k, top_p)
        assert torch.equal(ours > 0, full > 0), (top_k, top_p)  # the same support, tie by tie
        torch.testing.assert_close(ours, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("top_k", "top_p"), [(4, 1.0), (4, 0.8), (4, 0.5), (7, 0.9), (2, 0.6)])
def test_draws_follow_the_full_vocabulary_distribution(top_k, top_p):
    settings = SamplingSettings(temperature=1.0, top_k=top_k, top_p=top_p)
    logits = tied_logits()
    expected = sampling_probabilities(logits, settings)
    rows = 6000
    torch.manual_seed(0)
    drawn = top_k_draw(logits.repeat_interleave(rows, 0), top_k, top_p).view(len(logits), rows)
    for row in range(len(logits)):
        counts = torch.bincount(drawn[row], minlength=logits.shape[1]).double() / rows
        assert counts[expected[row] == 0].sum() == 0, (row, counts)
        p = expected[row].double()
        assert ((counts - p).abs() <= 5 * (p * (1 - p) / rows).sqrt() + 2e-3).all(), (row, counts, p)


def test_sampling_uses_the_candidates_and_matches_the_full_draw_in_distribution():
    """`sample_from_logits` takes the candidate path for the paper's settings (temperature included); the full
    path's exponential race over the vocabulary gives statistically the same tokens."""
    settings = SamplingSettings(temperature=0.7, top_k=50, top_p=0.95)
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(3)).repeat(20000, 1) * 3
    torch.manual_seed(1)
    ours = sample_from_logits(logits, settings)
    torch.manual_seed(2)
    full = _categorical(filtered_logits(logits.float(), settings))
    expected = sampling_probabilities(logits[:1], settings)[0].double()
    for drawn in (ours, full):
        counts = torch.bincount(drawn, minlength=500).double() / len(drawn)
        assert counts[expected == 0].sum() == 0
        assert ((counts - expected).abs() <= 5 * (expected * (1 - expected) / len(drawn)).sqrt() + 2e-3).all()


def test_the_draw_is_seeded():
    logits = tied_logits().repeat(50, 1)
    torch.manual_seed(5)
    first = top_k_draw(logits, 4, 0.8)
    torch.manual_seed(5)
    assert torch.equal(first, top_k_draw(logits, 4, 0.8))
