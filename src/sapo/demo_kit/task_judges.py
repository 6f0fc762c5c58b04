"""Scoring the offline task families: `judge` (a response against its record, in [0, 1]) and `score_responses`
(means per family and overall). See `sapo.demo_kit.tasks` for the families."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

# ------------------------------------------------------------------------------------------------
# Judging
# ------------------------------------------------------------------------------------------------
from sapo.demo_kit.tasks import (
    _INTEGER,
    _LOWER_WORD,
    _UPPER_WORD,
    ALL_FAMILIES,
    CONSTRAINT_KINDS,
    PARTIAL_CREDIT,
    Record,
    prompt_of,
)


def judge(prompt: str, response: str, record: Record) -> float:
    """Score ``response`` to ``prompt`` in [0, 1] using the ground truth carried by ``record``.

    ``prompt`` is accepted so the signature matches reward functions; the record alone decides the score.
    Decode generations with ``skip_special_tokens=True``: a literal ``</s>`` left in the text is junk.
    Never raises on model output (any string, or a non-string, which scores 0).
    """
    scorer = _JUDGES.get(record["task"])
    if scorer is None:
        raise ValueError(f"record has unknown task {record['task']!r}; known: {ALL_FAMILIES}")
    if not isinstance(response, str):
        return 0.0
    return min(1.0, max(0.0, scorer(response.strip(), record)))


def _exact_with_partial_credit(response: str, record: Record) -> float:
    """1.0 for the exact reference, else a similarity-based score strictly below ``PARTIAL_CREDIT``."""
    reference = record["reference"]
    if response == reference:
        return 1.0
    # The reference as the second sequence keeps the matcher's cost linear in the response length.
    return PARTIAL_CREDIT * difflib.SequenceMatcher(None, response, reference, autojunk=False).ratio()


def _judge_constraint(response: str, record: Record) -> float:
    checks = _constraint_checks(response, record["kind"], record["params"])
    return sum(checks) / len(checks)


def _constraint_checks(response: str, kind: str, params: dict[str, Any]) -> list[bool]:
    """One boolean per constraint of the instruction; all true means the response is fully correct.

    * ``repeat``: only the requested letter; exactly ``n`` characters.
    * ``lower_words``/``upper_words``: exactly ``n`` words; every word is all lowercase/uppercase ASCII
      letters; one word is the topic (any case).
    * ``numbers``: every item is an integer; exactly ``n`` items; every item is above ``bound``.
    """
    n = params["n"]
    if kind == "repeat":
        return [set(response) == {params["char"]}, len(response) == n]
    items = response.split()
    if kind in ("lower_words", "upper_words"):
        pattern = _LOWER_WORD if kind == "lower_words" else _UPPER_WORD
        return [
            len(items) == n,
            bool(items) and all(pattern.fullmatch(w) for w in items),
            any(w.lower() == params["topic"] for w in items),
        ]
    if kind == "numbers":
        integers = [int(w) for w in items if _INTEGER.fullmatch(w)]
        return [
            bool(items) and len(integers) == len(items),
            len(items) == n,
            bool(integers) and all(i > params["bound"] for i in integers),
        ]
    raise ValueError(f"unknown constraint kind {kind!r}; known: {CONSTRAINT_KINDS}")


# -- structured families: credit per step, line or sentence ---------------------------------------

_STEP = re.compile(r"(\d{1,9})\+(\d{1,9})=(\d{1,9})")


def _judge_chain(response: str, record: Record) -> float:
    """One credit per step whose operands follow the chain (the model's own previous total, then the prompt's
    next number) and whose sum is right, one for the right final answer: a single slip costs its step and the
    answer, not every later step. Out of max(expected, written) lines, so padding with extra lines costs."""
    numbers = [int(word) for word in prompt_of(record).split()[1:]]
    lines = [line.strip() for line in response.split("\n")]
    credit, running = 0, numbers[0]
    for step, number in enumerate(numbers[1:]):
        match = _STEP.fullmatch(lines[step]) if step < len(lines) else None
        a, b, total = (int(g) for g in match.groups()) if match else (None, None, None)
        credit += a == running and b == number and total == running + number
        running = total if total is not None else running + number
    answer_line = len(numbers) - 1
    credit += answer_line < len(lines) and lines[answer_line] == f"answer {sum(numbers)}"
    return credit / max(len(numbers), len(lines))


def _judge_listing(response: str, record: Record) -> float:
    """The fraction of lines that are exactly the reference's line at that position."""
    expected = record["reference"].split("\n")
    lines = [line.strip() for line in response.split("\n")]
    credit = sum(line == want for line, want in zip(lines, expected, strict=False))
    return credit / max(len(expected), len(lines))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _judge_profile(response: str, record: Record) -> float:
    """The fraction of the reference's sentences stated exactly (in any order), out of max(expected, written)."""
    expected = _SENTENCE_END.split(record["reference"])
    written = [sentence for sentence in _SENTENCE_END.split(response) if sentence]
    remaining = list(expected)
    for sentence in written:
        if sentence in remaining:
            remaining.remove(sentence)
    return (len(expected) - len(remaining)) / max(len(expected), len(written))


def _judge_format(response: str, record: Record) -> float:
    """Four checks per line (capitalised, the asked number of words, names the topic, ends with the mark), out of
    four per line for max(asked, written) lines."""
    params = record["params"]
    lines = [line.strip() for line in response.split("\n") if line.strip()]
    passed = sum(sum(_format_checks(line, params)) for line in lines[:params["n"]])
    return passed / (4 * max(params["n"], len(lines)))


def _format_checks(line: str, params: dict[str, Any]) -> list[bool]:
    words = line.rstrip(".!?").split()
    return [
        line[:1].isupper(),
        len(words) == params["bound"],
        params["topic"] in (w.lower() for w in words),
        line.endswith(params["char"]) and not line.endswith(params["char"] * 2),
    ]


_JUDGES: dict[str, Callable[[str, Record], float]] = {
    "arithmetic": _exact_with_partial_credit,
    "string": _exact_with_partial_credit,
    "constraint": _judge_constraint,
    "chain": _judge_chain,
    "listing": _judge_listing,
    "profile": _judge_profile,
    "format": _judge_format,
}


def score_responses(records: Sequence[Record], responses: Sequence[str]) -> dict[str, float]:
    """Mean judge score overall (key ``"overall"``) and per family present (keyed by family name)."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    by_family: dict[str, list[float]] = {}
    for record, response in zip(records, responses, strict=True):
        by_family.setdefault(record["task"], []).append(judge(prompt_of(record), response, record))
    scores = [s for family_scores in by_family.values() for s in family_scores]
    result = {"overall": _mean(scores)}
    result.update({family: _mean(by_family[family]) for family in sorted(by_family, key=_family_order)})
    return result


def _family_order(family: str) -> tuple[int, str]:
    return (ALL_FAMILIES.index(family) if family in ALL_FAMILIES else len(ALL_FAMILIES), family)


def _mean(values: Sequence[float]) -> float:
    """0.0 for no values, so an empty evaluation reads as "nothing solved" rather than NaN."""
    return sum(values) / len(values) if values else 0.0
