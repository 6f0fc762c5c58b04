"""Golden test: every recipe's fixed-seed run (scripts/recipe_fingerprints.py: a tiny saved model, 6 steps, a
mid-run checkpoint) still gives the recorded per-step losses, final policy, EMA model and replay buffer.

This pins behaviour across refactors ("move-only" commits must leave it green). Exact digests of float weights can
differ between CPUs, so losses are compared with a relative tolerance and weights by per-tensor sums and sums of
squares. An intended behaviour change regenerates tests/golden_recipes.json (see the script's docstring) and says
so in its commit.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden_recipes.json")
LOSS_TOLERANCE = 1e-5  # relative
STATISTIC_TOLERANCE = 1e-6  # relative, with an absolute floor scaled by the tensor's norm (a sum may be near 0)


def _script():
    spec = importlib.util.spec_from_file_location("recipe_fingerprints", ROOT / "scripts" / "recipe_fingerprints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def observed() -> dict[str, dict]:
    script = _script()
    return script.fingerprints({}, script.tensors_statistics)


def _statistics_differences(where: str, expected: dict[str, list[float]], got: dict[str, list[float]]) -> list[str]:
    if set(expected) != set(got):
        return [f"{where}: tensors {sorted(set(expected) ^ set(got))} appear on one side only"]
    found = []
    for name, (total, squares) in expected.items():
        floor = STATISTIC_TOLERANCE * (1.0 + math.sqrt(squares))
        for label, want, have in (("sum", total, got[name][0]), ("sum of squares", squares, got[name][1])):
            if not math.isclose(want, have, rel_tol=STATISTIC_TOLERANCE, abs_tol=floor):
                found.append(f"{where}.{name} {label}: expected {want!r}, got {have!r}")
    return found


def test_golden_file_covers_every_recipe():
    from sapo.config import RECIPES

    assert set(json.loads(GOLDEN.read_text())) == set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(json.loads(GOLDEN.read_text())))
def test_recipe_reproduces_its_golden_run(recipe: str, observed: dict[str, dict]):
    expected, got = json.loads(GOLDEN.read_text())[recipe], observed[recipe]
    assert sorted(got) == sorted(expected), f"{recipe}: prints {sorted(got)} vs golden {sorted(expected)}"
    assert len(got["losses"]) == len(expected["losses"]), f"{recipe}: logged steps differ"
    for step, (want, have) in enumerate(zip(expected["losses"], got["losses"], strict=True), start=1):
        assert math.isclose(want, have, rel_tol=LOSS_TOLERANCE), f"{recipe} step {step}: loss {have!r} != {want!r}"
    differences = [d for part in ("policy", "ema", "buffer") if part in expected
                   for d in _statistics_differences(f"{recipe}.{part}", expected[part], got[part])]
    assert not differences, "\n".join(differences[:10])
