"""benchmarks/quality.py in a drastically reduced form: every recipe, 2 steps, 1 seed, 8 held-out prompts."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def quality():
    yield from load_benchmark("quality")


def tiny_settings(quality, out, **overrides):
    values = dict(out=str(out), seeds=(0,), n_train=64, n_heldout=8, hidden_size=32, num_layers=2, sft_steps=3,
                  sft_batch_size=8, steps=2, batch_size=4, warmup_steps=0, eval_every=1, max_new_tokens=8,
                  token_generate_length=3, max_length=64, max_prompt_length=48)
    values.update(overrides)
    return quality.Settings(**values)


@pytest.fixture(scope="module")
def result(quality, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    return quality.run_benchmark(tiny_settings(quality, out), log=lambda *_: None), out


def test_benchmark_writes_table_json_and_png(quality, result):
    result, out = result
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| recipe")]
    assert [row.split(" | ")[0][2:] for row in rows] == [quality.START, *quality.RECIPES]
    header = table.splitlines()[2]
    assert header.count("|") == table.splitlines()[3].count("|")  # separator matches the header
    assert "learning rate 2e-05 for every recipe" in table and "2 optimizer steps" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sft" / "config.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == set(quality.RECIPES)
    for recipe, runs in saved["runs"].items():
        (run,) = runs
        assert run["seed"] == 0 and [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert run["curve"][0]["overall"] == saved["start"]["overall"]  # every curve starts at the checkpoint
        assert run["final"]["overall"] == run["curve"][-1]["overall"]
        assert len(run["scores"]) == len(run["responses"]) == 8
        assert 0.0 <= run["win_vs_start"]["win_rate"] <= 1.0
        assert (out / "runs" / recipe / "seed-0" / "metrics.jsonl").is_file()
        assert saved["summary"][recipe]["overall"]["values"] == [run["final"]["overall"]]
    assert saved["families"] == ["arithmetic", "string", "constraint"]


def test_final_score_matches_an_independent_evaluation(quality, result):
    """The callback's numbers are the judge's mean over the stored responses."""
    from sapo import tasks

    result, _ = result
    heldout = tasks.make_suite(64, 8, seed=quality.SUITE_SEED)["heldout"]
    run = result["runs"]["sapo-dpo"][0]
    assert run["final"]["overall"] == pytest.approx(tasks.score_responses(heldout, run["responses"])["overall"])


def test_summary_is_mean_and_sample_std_over_seeds(quality):
    start = {"overall": 0.5, "mean_length": 3.0, "by_family": {"a": 0.5}}
    runs = {"sft": [{"final": {"overall": v, "a": v, "mean_length": 2.0}, "win_vs_start": {"win_rate": 0.5},
                     "seconds": 1.0} for v in (0.2, 0.4)]}
    summary = quality.summarise(start, runs, ["a"])
    assert summary["sft"]["overall"]["mean"] == pytest.approx(0.3)
    assert summary["sft"]["overall"]["std"] == pytest.approx(0.1414213562)
    assert quality._cell(summary["sft"]["overall"]) == "0.300 ± 0.141"
    assert quality._cell(summary[quality.START]["overall"]) == "0.500"


def test_per_recipe_learning_rates_are_stated_in_the_header(quality, result):
    result, _ = result
    settings = dict(result["settings"], lr_for={"dpo": 1e-4})
    table = quality.markdown_table(dict(result, settings=settings))
    assert "learning rate per recipe: sft 2e-05, dpo 0.0001, orpo 2e-05" in table


def test_quick_preset_and_overrides(quality):
    quick = quality.settings_from_args(["--quick", "--out", "x", "--seeds", "3", "4", "--lr_for", "spin=1e-4"])
    assert quick.out == "x" and quick.seeds == (3, 4) and quick.lr_for == {"spin": 1e-4}
    assert quick.steps == quality.QUICK["steps"] and len(quality.QUICK["seeds"]) >= 2
    full = quality.settings_from_args(["--full"])
    assert full == quality.Settings() and len(full.seeds) >= 3 and full.recipes == quality.RECIPES


def test_unknown_recipe_is_rejected_before_training(quality, tmp_path):
    with pytest.raises(ValueError, match="unknown recipe"):
        quality.run_benchmark(tiny_settings(quality, tmp_path, recipes=("sft", "kto")))
