"""benchmarks/reference_reuse.py: the share of drawn replay pairs whose reference scores are already known."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark  # a benchmark script at tiny size; `-m "not benchmark"` skips these

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "reference_reuse.py"


@pytest.fixture(scope="module")
def reuse():
    spec = importlib.util.spec_from_file_location("reference_reuse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_buffer_that_stops_growing_is_drawn_from_again_and_again(reuse):
    # One round at step 0 (the next would come at step 100) leaves 8 entries; every later draw is one of them.
    late, first = reuse.reused_fractions(capacity=8, batch=8, round_rows=800, steps=50, windows=[(10, 50), (0, 1)])
    assert late == 1.0
    assert first < 1.0  # the very first draws are new (repeats within one draw of 8 count as known)


def test_refreshes_drop_what_was_known_and_fresh_rounds_dilute_it(reuse):
    windows = [(100, 400)]
    [never] = reuse.reused_fractions(200, 8, 64, 400, windows)
    [refreshed] = reuse.reused_fractions(200, 8, 64, 400, windows, refresh_every=10)
    assert 0 < refreshed < never < 1
    with pytest.raises(ValueError, match="multiple of batch"):
        reuse.reused_fractions(200, 8, 60, 10, windows)


def test_the_command_prints_both_windows(reuse, capsys):
    reuse.main(["--steps", "300", "--capacity", "100"])
    out = capsys.readouterr().out
    assert "steps 0-250:" in out and "steps 0-300:" in out and "drawn before" in out
