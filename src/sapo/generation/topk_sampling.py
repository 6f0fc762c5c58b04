"""Drawing a token from the top-k candidates only, with `generate`'s top-k/top-p semantics and exact ties.

The full-vocabulary path (`sapo.generation.filtered_logits`, then a softmax and an exponential race over every
token) spends, per decode step and row, a float32 softmax, one exponential random number and a division for each
of the vocabulary's ids (151936 for Qwen2), though at most the k largest logits plus the tokens tied with the
k-th value can ever be drawn. Here the race runs over k + 1 entries: the kept candidates above the k-th value,
and the group of kept tokens tied with it as one entry weighted by its total probability. When the group wins, one
of its tokens is picked uniformly (they all have the same probability). Left over on the vocabulary are a
comparison with the k-th value and an integer running count of the tied tokens (to find the chosen one), both
cheap next to what is removed.

The kept set is computed exactly as the full path computes it (`_top_k_top_p`'s rules: top-k keeps every token
tied with the k-th value; top-p walks the candidates in ascending (value, token id) order and drops the lowest
ids of a tied group first), so the distribution drawn from is the full path's (`top_k_probabilities` writes it
out over the vocabulary; tests compare the two).
"""

from __future__ import annotations

import torch


def top_k_set(logits: torch.Tensor, top_k: int):
    """The top-k set both the full path (`_top_k_top_p`) and the draw start from, per row: the k largest
    (value, id), the k-th value, the tokens tied with it (a (batch, vocab) mask) and their count, how many of them
    topk left out, and the candidates' unnormalised weights, as softmax computes them (exp(x - max)), so that
    exact cases such as q = 1/2 stay exact and both paths' top-p decides the same."""
    values, indices = torch.topk(logits, top_k, dim=-1)
    kth = values[..., -1:]
    tied = logits == kth
    n_tied = tied.sum(-1, keepdim=True)
    left_out = (n_tied - (values == kth).sum(-1, keepdim=True)).to(values.dtype)
    weights = (values - values[..., :1]).exp()
    return values, indices, kth, tied, n_tied, left_out, weights


def _candidates(logits: torch.Tensor, top_k: int, top_p: float):
    """Per row: the k largest (value, id), which of them above the k-th value are kept, the tied group (a
    (batch, vocab) mask), its size, how many of its lowest ids top-p removes, and the unnormalised weights."""
    values, indices, kth, tied, n_tied, left_out, weights = top_k_set(logits, top_k)
    above = values > kth
    if top_p >= 1.0:
        return values, indices, above, weights, tied, n_tied, torch.zeros_like(n_tied)
    norm = weights.sum(-1, keepdim=True) + left_out * weights[..., -1:]
    tie_prob = weights[..., -1:] / norm
    threshold = 1 - top_p
    # Candidates in ascending (value, id) order, the order a stable sort of the vocabulary walks.
    id_order = indices.sort(dim=-1).indices
    ascending, position = values.gather(-1, id_order).sort(dim=-1, stable=True)
    walk = id_order.gather(-1, position)  # candidate index at each ascending position
    remove = (weights / norm).gather(-1, walk).cumsum(-1) + left_out * tie_prob <= threshold
    remove[..., -1] = False  # the most likely token always stays
    kept_sorted = (ascending > kth) & ~remove
    keep = torch.zeros_like(kept_sorted).scatter_(-1, walk, kept_sorted)
    removed = torch.floor(threshold / tie_prob).clamp(min=0)
    top_is_tied = (values[..., :1] == kth).long()
    removed = torch.minimum(removed, (n_tied - top_is_tied).to(removed.dtype)).long()
    return values, indices, keep, weights, tied, n_tied, removed


def top_k_probabilities(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(batch, vocab) distribution that `top_k_draw` draws from, written out over the vocabulary (for tests and
    inspection: the draw itself never builds it)."""
    _, indices, keep, weights, tied, n_tied, removed = _candidates(logits, top_k, top_p)
    mass = torch.zeros_like(logits).scatter_(-1, indices, torch.where(keep, weights, 0.0))
    kept_ties = tied & (tied.cumsum(-1, dtype=torch.int32) > removed)
    mass = mass + kept_ties * weights[..., -1:]
    return mass / mass.sum(-1, keepdim=True)


def top_k_draw(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row of (batch, vocab) float logits (temperature applied), drawn from softmax over the tokens
    that top-k (ties kept) then top-p keep; no host synchronisation, fixed shapes (it compiles and is captured in
    a CUDA graph like the full path)."""
    _, indices, keep, weights, tied, n_tied, removed = _candidates(logits, top_k, top_p)
    n_kept_ties = n_tied - removed
    race = torch.cat([torch.where(keep, weights, 0.0), n_kept_ties.to(weights.dtype) * weights[..., -1:]], dim=-1)
    noise = torch.empty_like(race).exponential_().clamp_(min=torch.finfo(race.dtype).tiny)
    winner = (race / noise).argmax(dim=-1, keepdim=True)  # exponential race: index i with probability race_i / sum
    candidate = indices.gather(-1, winner.clamp(max=top_k - 1))
    # The group won: the r-th kept tie, r uniform over removed + 1 .. n_tied (top-p drops the lowest ids first).
    uniform = torch.rand(n_tied.shape, device=logits.device, dtype=weights.dtype)
    rank = (removed + 1 + (uniform * n_kept_ties.to(weights.dtype)).long()).clamp(max=n_tied)
    tie = (tied.cumsum(-1, dtype=torch.int32) == rank).int().argmax(dim=-1, keepdim=True)
    return torch.where(winner == top_k, tie, candidate).squeeze(-1)
