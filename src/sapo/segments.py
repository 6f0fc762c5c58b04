"""Segment-level regeneration arithmetic for SAPO rejected responses.

SAPO (arXiv 2405.20830) builds a rejected response by letting the EMA model rewrite one
segment of the real response: the real response is truncated at a random point ``k``, the
model samples ``G`` tokens there, and the rest of the real response is spliced back so the
rejected sequence differs from the chosen one only locally.  Everything here is plain
integer/list arithmetic so that it can be tested exhaustively without a model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

__all__ = [
    "SegmentRewrite",
    "generation_length",
    "rewrite_segments",
    "sample_truncation_point",
    "splice_rejected",
    "truncation_bound",
]

Generate = Callable[[Sequence[Sequence[int]], int], list[list[int]]]  # (contexts, max new tokens) -> samples

# Tokens kept after the regenerated segment at the latest truncation point; the paper's
# reference code leaves a short tail so the segment never swallows the final EOS.
_TAIL_MARGIN = 3


def _require_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def generation_length(response_length: int, token_generate_length: int) -> int:
    """Clamp the segment to the response so a short response is rewritten whole, never padded."""
    _require_non_negative("response_length", response_length)
    if token_generate_length < 1:
        raise ValueError(f"token_generate_length must be >= 1, got {token_generate_length}")
    return min(token_generate_length, response_length)


def truncation_bound(
    prompt_length: int, response_length: int, generation_length: int, max_length: int
) -> int:
    """Largest admissible truncation point; ``<= 0`` means the caller must use ``k = 0``.

    Two limits apply: keep a short tail of the real response after the segment, and keep
    ``prompt_length + k + generation_length <= max_length`` so generation never exceeds the
    model's budget.  The value is returned unclamped (possibly negative) so callers can tell
    how far off the constraints are.
    """
    _require_non_negative("prompt_length", prompt_length)
    _require_non_negative("response_length", response_length)
    _require_non_negative("generation_length", generation_length)
    _require_non_negative("max_length", max_length)
    if generation_length > response_length:
        raise ValueError(
            f"generation_length ({generation_length}) must not exceed response_length ({response_length})"
        )
    room = max_length - prompt_length - generation_length
    return min(response_length - _TAIL_MARGIN - generation_length, room)


def sample_truncation_point(
    prompt_length: int,
    response_length: int,
    token_generate_length: int,
    max_length: int,
    rng: random.Random,
) -> tuple[int, int]:
    """Draw ``(k, G)`` uniformly over the admissible truncation points.

    The rng is only consumed when there is an actual choice (bound > 0), so forcing ``k = 0``
    for short responses does not shift the random stream of the remaining examples.
    Note that with ``k = 0`` the max-length constraint may still be violated when the prompt
    alone is too long; truncating the prompt is the caller's job.
    """
    g = generation_length(response_length, token_generate_length)
    bound = truncation_bound(prompt_length, response_length, g, max_length)
    k = rng.randint(0, bound) if bound > 0 else 0
    return k, g


def _first_eos(tokens: Sequence[int], eos_token_ids: Collection[int]) -> int | None:
    for i, tok in enumerate(tokens):
        if tok in eos_token_ids:
            return i
    return None


def splice_rejected(
    response: Sequence[int],
    k: int,
    generated: Sequence[int],
    generation_length: int,
    eos_token_ids: Collection[int],
) -> tuple[list[int], int]:
    """Build the rejected response and report how many sampled tokens it kept.

    If the model ended its sample (an EOS inside the first ``generation_length`` tokens), the
    rejected response ends there too: splicing the real suffix after an EOS would create a
    sequence the model could never produce.  Otherwise only the segment ``[k, k+G)`` is
    replaced, keeping the real suffix so the preference signal is local to the segment.
    ``generated`` may be longer than ``generation_length`` (batch-padded generation); the
    excess is ignored.
    """
    _require_non_negative("generation_length", generation_length)
    if not 0 <= k <= len(response):
        raise ValueError(f"k must be in [0, len(response)={len(response)}], got {k}")
    if k + generation_length > len(response):
        raise ValueError(
            f"k + generation_length ({k} + {generation_length}) exceeds len(response) ({len(response)})"
        )
    sample = list(generated[:generation_length])
    eos_at = _first_eos(sample, eos_token_ids)
    if eos_at is not None:
        kept = eos_at + 1
        return list(response[:k]) + sample[:kept], kept
    if len(sample) < generation_length:
        raise ValueError(
            f"generated has {len(sample)} tokens and no EOS, expected at least "
            f"generation_length={generation_length}"
        )
    return list(response[:k]) + sample + list(response[k + generation_length :]), generation_length


@dataclass(frozen=True)
class SegmentRewrite:
    """One rejected response made from the real response of example `example`."""

    example: int
    segment_start: int
    rejected: list[int]
    replaced: int  # tokens of the real response the segment replaced


def rewrite_segments(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], generate: Generate, *,
                     token_generate_length: int, max_length: int, eos_token_ids: Collection[int],
                     rng: random.Random, samples_per_example: int = 1) -> list[SegmentRewrite]:
    """SPEC §1 step 2 for a batch: a truncation point per example from `rng`, `samples_per_example` samples of the
    segment after prompt + real prefix (one `generate` call for all), each spliced into its real response. Used
    by training (the replay buffer's entries) and by evaluation (its fixed pairs), so both rewrite alike."""
    plans = [sample_truncation_point(len(p), len(y), token_generate_length, max_length, rng)
             for p, y in zip(prompts, responses, strict=True)]
    if not plans:
        return []
    contexts = [list(p) + list(y[:k]) for p, y, (k, _) in zip(prompts, responses, plans, strict=True)
                for _ in range(samples_per_example)]
    samples = generate(contexts, max(g for _, g in plans))
    rewrites = []
    for index, sample in enumerate(samples):
        example = index // samples_per_example
        k, gen_len = plans[example]
        rejected, replaced = splice_rejected(responses[example], k, sample, gen_len, eos_token_ids)
        rewrites.append(SegmentRewrite(example, k, rejected, replaced))
    return rewrites
