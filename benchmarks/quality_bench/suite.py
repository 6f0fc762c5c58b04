"""The data: the start's demonstrations and the new ones, split by the rule in the settings; dev and held-out
prompts from the new side; drawn once per output directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .settings import SPLIT_RULES, SUITE_KEYS, SUITE_SEED, Settings, key_of

HARDER_FROM: dict[str, int] = {"chain": 6, "listing": 8, "profile": 5, "format": 5}
"""The "harder" rule: a record belongs to the new demonstrations when its size (``params["n"]``: numbers to add,
words to order, facts to state, lines to write) is at least this; the start learns the smaller ones."""


def is_new(record: dict[str, Any], rule: str) -> bool:
    """Whether a record belongs to the recipes' new demonstrations (else to the start's) under `rule`: "harder"
    by its size (HARDER_FROM), "same" by a hash of its prompt (same distribution, disjoint prompts)."""
    from sapo import tasks

    if rule == "harder":
        return record["params"]["n"] >= HARDER_FROM[record["task"]]
    digest = hashlib.sha256(("sapo.quality/new/" + tasks.prompt_of(record)).encode()).digest()
    return digest[0] % 2 == 1


def _share(total: int, index: int, parts: int) -> int:
    return total // parts + (index < total % parts)


def _drawn(family: str, split: str, rule: str, want_start: int, want_new: int) -> tuple[list[dict], list[dict]]:
    """The first `want_start` start-side and `want_new` new-side records of one family's hash split."""
    from sapo import tasks

    size = 2 * (want_start + want_new) + 50
    while True:
        pool = tasks.make_records(family, size, seed=SUITE_SEED, split=split)
        new = [r for r in pool if is_new(r, rule)]
        old = [r for r in pool if not is_new(r, rule)]
        if len(new) >= want_new and len(old) >= want_start:
            return old[:want_start], new[:want_new]
        size *= 2


def suite_of(settings: Settings) -> dict[str, list[dict]]:
    """`start`: the start's demonstrations; `train`: the new ones every recipe trains on; `dev` and `heldout`:
    new-side prompts for choices and for the table. The prompts of the four splits are disjoint. Drawn once and
    kept in `OUT/suite.json`, which every worker reads (drawing takes seconds, reading milliseconds)."""
    if settings.split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split_rule {settings.split_rule!r}; choose from {', '.join(SPLIT_RULES)}")
    path = Path(settings.out) / "suite.json"
    key = key_of(settings, SUITE_KEYS)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["suite"]
    suite = draw_suite(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_file = path.with_suffix(f".{os.getpid()}.tmp")
    partial_file.write_text(json.dumps({"key": key, "suite": suite}), encoding="utf-8")
    partial_file.replace(path)  # whole or not at all, should two processes draw at once
    return suite


def draw_suite(settings: Settings) -> dict[str, list[dict]]:
    """The four splits, drawn from the task generators (see `suite_of`)."""
    import random

    parts = len(settings.families)
    suite: dict[str, list[dict]] = {"start": [], "train": [], "dev": [], "heldout": []}
    for index, family in enumerate(settings.families):
        old, new = _drawn(family, "train", settings.split_rule, _share(settings.n_start, index, parts),
                          _share(settings.n_train, index, parts))
        suite["start"] += old
        suite["train"] += new
        for split, total in (("dev", settings.n_dev), ("heldout", settings.n_heldout)):
            suite[split] += _drawn(family, split, settings.split_rule, 0, _share(total, index, parts))[1]
    for split, records in suite.items():
        random.Random(f"sapo.quality/{split}").shuffle(records)
    return suite


def start_dev(settings: Settings) -> list[dict]:
    """Dev prompts of the start's own side (its SFT curve shows it learned its demonstrations)."""
    parts = len(settings.families)
    return [r for i, family in enumerate(settings.families)
            for r in _drawn(family, "dev", settings.split_rule, _share(settings.n_dev, i, parts), 0)[0]]


def diagnostic_records(settings: Settings, suite: dict[str, list[dict]]) -> list[dict]:
    """The first `diagnostic_per_family` new training records of each family: the census's and fixed pairs'."""
    return [r for family in settings.families
            for r in [r for r in suite["train"] if r["task"] == family][:settings.diagnostic_per_family]]
