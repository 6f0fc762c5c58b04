"""Built-in tasks with programmatic judges, small enough for the tiny character-level model.

Each family yields chat records whose answers are a few characters long, so a model from
:mod:`sapo.tiny` can learn them on a CPU in minutes, and whose correctness a short function can check, so
training runs can be scored without a reward model or a hub download.

Every record has the same keys whatever its family (so ``datasets.Dataset.from_list`` on a mixed suite keeps
all of them)::

    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}],
     "task": family, "kind": sub-task, "reference": reference answer,
     "rejected": a realistic mistaken answer (for preference baselines such as DPO),
     "params": {"n": int, "char": str, "topic": str, "bound": int}}   # used by the constraint judge

Scoring (:func:`judge`), always in [0, 1], 1.0 only for a fully correct answer; the response is stripped of
surrounding whitespace first, and any other extra text makes it wrong:

* ``arithmetic`` and ``string`` have one right answer: 1.0 for an exact match, otherwise partial credit
  ``PARTIAL_CREDIT * difflib ratio(response, reference)``, always below ``PARTIAL_CREDIT`` (0.5), so that a
  model getting closer (right length, right digits) scores visibly higher before it is fully right.
* ``constraint`` (IFEval in spirit) has checkable constraints and possibly many valid answers: the score is
  the fraction of the kind's constraints the response satisfies (see :func:`_constraint_checks`).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from typing import Any

TASK_FAMILIES: tuple[str, ...] = ("arithmetic", "string", "constraint")
STRUCTURED_FAMILIES: tuple[str, ...] = ("chain", "listing", "profile", "format")
ALL_FAMILIES: tuple[str, ...] = (*TASK_FAMILIES, *STRUCTURED_FAMILIES)
SPLITS: tuple[str, ...] = ("train", "dev", "heldout")
HELDOUT_PERCENT = 20
DEV_PERCENT = 10
PARTIAL_CREDIT = 0.5

STRING_KINDS: tuple[str, ...] = ("reverse", "sort", "upper")
CONSTRAINT_KINDS: tuple[str, ...] = ("repeat", "lower_words", "upper_words", "numbers")
TOPICS: tuple[str, ...] = (
    "cats", "dogs", "birds", "fish", "rain", "snow", "trees", "books",
    "tea", "bread", "boats", "stars", "bees", "frogs", "hats", "songs",
)  # fmt: skip
FILLER_WORDS: tuple[str, ...] = (
    "big", "small", "red", "blue", "warm", "cold", "soft", "fast", "slow", "old",
    "new", "good", "happy", "like", "love", "see", "many", "few", "wild", "calm",
)  # fmt: skip

_INTEGER = re.compile(r"-?\d{1,9}")  # bounded so int() never meets a huge digit string
_LOWER_WORD = re.compile(r"[a-z]+")
_UPPER_WORD = re.compile(r"[A-Z]+")

Record = dict[str, Any]
# (kind, prompt, reference, rejected, params) drawn by one family's generator
Draw = tuple[str, str, str, str, dict[str, Any]]



# ------------------------------------------------------------------------------------------------
# Generators
# ------------------------------------------------------------------------------------------------


def _params(n: int = 0, char: str = "", topic: str = "", bound: int = 0) -> dict[str, Any]:
    """Same keys and types in every record, so Arrow infers one schema for a mixed suite."""
    return {"n": n, "char": char, "topic": topic, "bound": bound}


def _draw_arithmetic(rng: random.Random) -> Draw:
    """Add or subtract two numbers below 100; differences are kept non-negative."""
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return "add", f"{a}+{b}=", str(a + b), str(_addition_slip(a, b, rng)), _params()
    a, b = max(a, b), min(a, b)
    return "sub", f"{a}-{b}=", str(a - b), str(_subtraction_slip(a, b, rng)), _params()


def _addition_slip(a: int, b: int, rng: random.Random) -> int:
    """The classic forgotten carry when the units overflow, else an answer one unit or one ten off."""
    if a % 10 + b % 10 >= 10:
        return a + b - 10
    return _off_by_one(a + b, rng)


def _subtraction_slip(a: int, b: int, rng: random.Random) -> int:
    """The classic "smaller digit from larger" borrow error when a borrow is needed, else off by one."""
    if a % 10 < b % 10:
        return (a // 10 - b // 10) * 10 + (b % 10 - a % 10)
    return _off_by_one(a - b, rng)


def _off_by_one(value: int, rng: random.Random) -> int:
    """A nearby wrong value (one unit or one ten away) that is still a non-negative number."""
    return rng.choice([value + delta for delta in (1, -1, 10, -10) if value + delta >= 0])


def _draw_string(rng: random.Random) -> Draw:
    """Transform a random lowercase word; the rejected answer is the right output with one slip."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    kind = rng.choice(STRING_KINDS)
    if kind == "upper":
        answer = word.upper()
        keep = rng.randrange(len(word))  # one letter left un-capitalised
        rejected = answer[:keep] + word[keep] + answer[keep + 1 :]
    else:
        answer = word[::-1] if kind == "reverse" else "".join(sorted(word))
        rejected = _swap_adjacent(answer, rng)
    return kind, f"{kind}: {word}", answer, rejected, _params()


def _swap_adjacent(text: str, rng: random.Random) -> str:
    """Swap two neighbouring different characters (an almost-right order); drop the last one if all match."""
    positions = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if not positions:
        return text[:-1]
    i = rng.choice(positions)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _draw_constraint(rng: random.Random) -> Draw:
    """Pick an instruction whose constraints are programmatically checkable."""
    kind = rng.choice(CONSTRAINT_KINDS)
    if kind == "repeat":
        return _draw_repeat(rng)
    if kind == "numbers":
        return _draw_numbers(rng)
    return _draw_words(kind, rng)


def _draw_repeat(rng: random.Random) -> Draw:
    """Ask for a letter repeated n times ("repeat the letter x 5 times"); the rejected answer miscounts."""
    char, n = rng.choice(string.ascii_lowercase), rng.randint(2, 9)
    rejected = char * (n + rng.choice((1, -1)))
    return "repeat", f"repeat the letter {char} {n} times", char * n, rejected, _params(n=n, char=char)


def _draw_words(kind: str, rng: random.Random) -> Draw:
    """Ask for n words in one case about a topic; the rejected answer breaks exactly one constraint."""
    n, topic = rng.randint(2, 4), rng.choice(TOPICS)
    words = [topic, *rng.sample(FILLER_WORDS, n - 1)]
    rng.shuffle(words)
    case = str.lower if kind == "lower_words" else str.upper
    wrong_case = str.capitalize if kind == "lower_words" else str.lower
    if rng.random() < 0.5:  # one word in the wrong case
        i = rng.randrange(n)
        bad = [case(w) if j != i else wrong_case(w) for j, w in enumerate(words)]
    else:  # one word too many
        extra = rng.choice([w for w in FILLER_WORDS if w not in words])
        bad = [case(w) for w in (*words, extra)]
    prompt = f"write {n} {'lowercase' if kind == 'lower_words' else 'uppercase'} words about {topic}"
    reference = " ".join(case(w) for w in words)
    return kind, prompt, reference, " ".join(bad), _params(n=n, topic=topic)


def _draw_numbers(rng: random.Random) -> Draw:
    """Ask for n numbers above a bound; the rejected answer includes the bound or one number too many."""
    n, bound = rng.randint(2, 4), rng.randint(10, 89)
    candidates = range(bound + 1, bound + 21)
    numbers = sorted(rng.sample(candidates, n))
    bad = [bound, *numbers[1:]] if rng.random() < 0.5 else sorted(rng.sample(candidates, n + 1))
    prompt = f"list {n} numbers above {bound}"
    return "numbers", prompt, _join(numbers), _join(bad), _params(n=n, bound=bound)


def _join(numbers: Iterable[int]) -> str:
    return " ".join(map(str, numbers))


# -- structured families: long answers whose mistakes are local ---------------------------------

LIST_WORDS: tuple[str, ...] = tuple(sorted({*TOPICS, *FILLER_WORDS}))
LISTING_KINDS: tuple[str, ...] = ("sort", "reverse")
PROFILE_FIELDS: dict[str, tuple[str, ...]] = {
    "age": tuple(str(age) for age in range(3, 13)),
    "city": ("Rome", "Oslo", "Lima", "Kyiv", "Pune", "Bern", "Nice", "Cork"),
    "pet": ("cat", "dog", "frog", "bird", "fish", "goat"),
    "food": ("rice", "soup", "figs", "pears", "bread", "plums"),
    "color": ("red", "blue", "green", "pink", "gray", "gold"),
}
PROFILE_NAMES: tuple[str, ...] = ("Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Ida", "Jo", "Kai", "Lu", "Max")
FORMAT_ENDINGS: tuple[str, ...] = (".", "!")


def _draw_chain(rng: random.Random) -> Draw:
    """Add 4-7 numbers one step per line ("47+38=85"), then "answer N"; the rejected answer slips one carry
    and carries the wrong total on consistently, as a model's local error would."""
    numbers = [rng.randint(2, 99) for _ in range(rng.randint(4, 7))]
    slip = rng.randrange(len(numbers) - 1)
    reference, rejected = _chain_text(numbers), _chain_text(numbers, slip, rng)
    return "sum", "sum " + _join(numbers), reference, rejected, _params(n=len(numbers))


def _chain_text(numbers: Sequence[int], slip: int | None = None, rng: random.Random | None = None) -> str:
    lines, running = [], numbers[0]
    for step, number in enumerate(numbers[1:]):
        total = _addition_slip(running, number, rng) if step == slip and rng is not None else running + number
        lines.append(f"{running}+{number}={total}")
        running = total
    return "\n".join([*lines, f"answer {running}"])


def _draw_listing(rng: random.Random) -> Draw:
    """Number 5-9 words, sorted or in reverse order, one per line ("1. bees"); the rejected answer swaps two
    neighbouring items."""
    kind = rng.choice(LISTING_KINDS)
    words = rng.sample(LIST_WORDS, rng.randint(5, 9))
    ordered = _listing_order(kind, words)
    i = rng.randrange(len(ordered) - 1)
    swapped = [*ordered[:i], ordered[i + 1], ordered[i], *ordered[i + 2:]]
    return kind, f"{kind}: {' '.join(words)}", _numbered(ordered), _numbered(swapped), _params(n=len(words))


def _listing_order(kind: str, words: Sequence[str]) -> list[str]:
    return sorted(words) if kind == "sort" else list(reversed(words))


def _numbered(items: Sequence[str]) -> str:
    return "\n".join(f"{index}. {item}" for index, item in enumerate(items, start=1))


def _draw_profile(rng: random.Random) -> Draw:
    """State 3-5 facts given as fields, one sentence each in the prompt's order ("Bo lives in Oslo."); the
    rejected answer gets one fact wrong."""
    name = rng.choice(PROFILE_NAMES)
    fields = rng.sample(list(PROFILE_FIELDS), rng.randint(3, 5))
    values = {field: rng.choice(PROFILE_FIELDS[field]) for field in fields}
    wrong_field = rng.choice(fields)
    wrong = dict(values, **{wrong_field: rng.choice([v for v in PROFILE_FIELDS[wrong_field]
                                                     if v != values[wrong_field]])})
    prompt = f"facts: name={name} " + " ".join(f"{field}={values[field]}" for field in fields)
    return "profile", prompt, _profile_text(name, values), _profile_text(name, wrong), _params(n=len(fields))


_PROFILE_SENTENCES: dict[str, str] = {
    "age": "{name} is {value} years old.", "city": "{name} lives in {value}.", "pet": "{name} has a {value}.",
    "food": "{name} likes {value}.", "color": "{name} loves {value}.",
}


def _profile_text(name: str, values: dict[str, str]) -> str:
    return " ".join(_PROFILE_SENTENCES[field].format(name=name, value=value) for field, value in values.items())


def _draw_format(rng: random.Random) -> Draw:
    """Write n lines about a topic, w words each, capitalised, each naming the topic and ending with a given
    mark; many answers are valid. The rejected answer breaks one constraint on one line."""
    n, width, topic, ending = rng.randint(3, 5), rng.randint(3, 5), rng.choice(TOPICS), rng.choice(FORMAT_ENDINGS)
    lines = [_format_line(topic, width, ending, rng) for _ in range(n)]
    broken = list(lines)
    i = rng.randrange(n)
    broken[i] = rng.choice([broken[i][:-1], broken[i].lower(), _format_line(topic, width + 1, ending, rng)])
    prompt = f"write {n} lines about {topic}, {width} words each, ending with {ending}"
    return "format", prompt, "\n".join(lines), "\n".join(broken), _params(n=n, char=ending, topic=topic,
                                                                             bound=width)


def _format_line(topic: str, width: int, ending: str, rng: random.Random) -> str:
    words = [topic, *rng.sample(FILLER_WORDS, width - 1)]
    rng.shuffle(words)
    return " ".join(words).capitalize() + ending


_GENERATORS: dict[str, Callable[[random.Random], Draw]] = {
    "arithmetic": _draw_arithmetic,
    "string": _draw_string,
    "constraint": _draw_constraint,
    "chain": _draw_chain,
    "listing": _draw_listing,
    "profile": _draw_profile,
    "format": _draw_format,
}


# ------------------------------------------------------------------------------------------------
# Records and suites
# ------------------------------------------------------------------------------------------------


def split_of(prompt: str) -> str:
    """Assign a prompt to a split by a stable hash, so train, dev (for choosing settings) and held-out (for the
    reported table) never share a prompt."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100
    if bucket < HELDOUT_PERCENT:
        return "heldout"
    return "dev" if bucket < HELDOUT_PERCENT + DEV_PERCENT else "train"


def make_records(family: str, n: int, *, seed: int, split: str = "train") -> list[Record]:
    """Draw ``n`` records of one family whose prompts hash into ``split``; same arguments, same records.

    Prompts are distinct while the family's prompt space allows it; once distinct prompts become hard to find
    (small spaces such as ``constraint`` with large ``n``), repeats are accepted rather than failing.
    """
    generator = _GENERATORS.get(family)
    if generator is None:
        raise ValueError(f"unknown task family {family!r}; choose from {ALL_FAMILIES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    rng = random.Random(f"sapo.tasks/{family}/{split}/{seed}")
    records: list[Record] = []
    seen: set[str] = set()
    patience = 20 * n + 1000  # draws allowed before duplicates are accepted
    draws = 0
    while len(records) < n:
        draws += 1
        if draws > 100 * patience:  # only reachable if a family's prompts never hash into this split
            raise RuntimeError(f"could not draw {n} {family!r} prompts for split {split!r}")
        kind, prompt, reference, rejected, params = generator(rng)
        if split_of(prompt) != split or (prompt in seen and draws < patience):
            continue
        seen.add(prompt)
        records.append(_record(family, kind, prompt, reference, rejected, params))
    return records


def _record(family: str, kind: str, prompt: str, reference: str, rejected: str, params: dict) -> Record:
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}],
        "task": family,
        "kind": kind,
        "reference": reference,
        "rejected": rejected,
        "params": params,
    }


def make_suite(
    n_train: int, n_heldout: int, *, seed: int = 0, families: Sequence[str] = TASK_FAMILIES, n_dev: int = 0
) -> dict[str, list[Record]]:
    """Train, dev and held-out records, split as evenly as possible across ``families`` and shuffled together."""
    if not families:
        raise ValueError("families must name at least one task family")
    return {
        split: _mixed_split(split, total, seed, tuple(families))
        for split, total in (("train", n_train), ("dev", n_dev), ("heldout", n_heldout))
    }


def _mixed_split(split: str, total: int, seed: int, families: tuple[str, ...]) -> list[Record]:
    counts = [total // len(families) + (i < total % len(families)) for i in range(len(families))]
    records = [
        record
        for family, count in zip(families, counts, strict=True)
        for record in make_records(family, count, seed=seed, split=split)
    ]
    random.Random(f"sapo.tasks/suite/{split}/{seed}").shuffle(records)
    return records


def prompt_of(record: Record) -> str:
    """The record's prompt text: the content of its last user message."""
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")
