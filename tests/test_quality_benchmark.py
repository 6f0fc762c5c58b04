"""benchmarks/quality.py in a drastically reduced form: the whole protocol (SFT start, dev grid, recipes, ablations,
diagnostics) with a tiny model, 2 steps, 1 seed, 8 held-out prompts; and its pure pieces."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import load_benchmark

RECIPES = ("sft", "dpo", "sapo-dpo")
ABLATIONS = ("whole", "no-replay")


@pytest.fixture(scope="module")
def quality():
    yield from load_benchmark("quality")


def tiny_settings(quality, out, **overrides):
    values = dict(out=str(out), seeds=(0,), recipes=RECIPES, ablations=ABLATIONS, n_train=64, n_dev=8,
                  n_heldout=8, hidden_size=32, num_layers=2, sft_steps=4, sft_batch_size=8, sft_eval_every=2,
                  steps=2, batch_size=4, warmup_steps=0, grid_learning_rates=(1e-4,), grid_betas=(0.1, 0.5),
                  eval_every=1, max_new_tokens=8, eval_batch_size=8, token_generate_length=3, ref_update_steps=1,
                  max_length=200, max_prompt_length=96, diagnostic_per_family=2, workers=1)
    values.update(overrides)
    return quality.Settings(**values)


@pytest.fixture(scope="module")
def result(quality, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    return quality.run_benchmark(tiny_settings(quality, out), log=lambda *_: None), out


def test_benchmark_writes_table_json_and_png(quality, result):
    result, out = result
    table = (out / "table.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in table.split("\n\n")[2].splitlines()[2:]]
    assert rows == [quality.START, *RECIPES, *(f"ablation: {a}: {quality.ABLATION_TEXT[a]}" for a in ABLATIONS)]
    header, separator = table.split("\n\n")[2].splitlines()[:2]
    assert header.count("|") == separator.count("|")
    assert "| sapo-dpo | all |" in table and "| sapo-dpo | chain |" in table  # over families, then per family
    assert "lr {0.0001} x beta {0.1, 0.5}" in table and "after 2 optimizer steps" in table
    for figure in ("curves.png", "diagnostics.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sft" / "config.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert [p["step"] for p in saved["sft"]["dev_curve"]] == [2, 4]
    assert len(saved["grid"]) == 1 + 2 + 2  # sft has no beta
    assert {g["recipe"] for g in saved["grid"]} == set(RECIPES)
    for run in saved["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert run["curve"][0]["overall"] == saved["start"]["overall"]  # every curve starts at the checkpoint
        assert run["final"]["overall"] == run["curve"][-1]["overall"]
        assert len(run["scores"]) == 8 and 0.0 <= run["win_vs_start"] <= 1.0
        assert (out / "runs" / run["group"] / run["name"] / "seed-0" / "metrics.jsonl").is_file()
        chosen = saved["chosen"][run["recipe"]]
        assert [run["learning_rate"], run["beta"]] == chosen
    assert saved["families"] == ["chain", "listing", "profile", "format"]


def test_recipes_are_tuned_on_dev_and_reported_on_heldout(quality, result):
    result, _ = result
    assert {g["recipe"]: g for g in result["grid"]}  # every grid run judged on dev
    for run in result["runs"]:
        assert run["split"] == "heldout" and run["group"] in ("main", "ablation")
    best = max((g for g in result["grid"] if g["recipe"] == "dpo"), key=lambda g: g["final"]["overall"])
    assert result["chosen"]["dpo"] == (best["learning_rate"], best["beta"])


def test_final_score_matches_an_independent_evaluation(quality, result):
    """The callback's numbers are the judge's mean over the stored responses, on the held-out split."""
    from sapo import tasks

    result, out = result
    heldout = quality.suite_of(quality.Settings(**result["settings"]))["heldout"]
    saved = json.loads((out / "runs" / "main" / "sapo-dpo" / "seed-0" / "result.json").read_text())
    scores = tasks.score_responses(heldout, saved["responses"])
    assert saved["final"]["overall"] == pytest.approx(scores["overall"])
    assert saved["final"]["chain"] == pytest.approx(scores["chain"])


def test_ablations_change_what_they_name(quality, result):
    """The whole-response ablation rewrites from k = 0; the base starts segments later; the diagnostics come
    from the trainer's own evaluation of fixed dev pairs, per family."""
    result, _ = result
    summary = result["summary"]
    whole = summary["ablation: whole"]["diagnostics"]
    base = summary["sapo-dpo"]["diagnostics"]
    starts = [whole[f]["buffer/segment_start"] for f in whole if "buffer/segment_start" in whole[f]]
    assert starts and all(start == 0.0 for start in starts)  # the buffer holds the first round: some families
    assert any(base[f].get("buffer/segment_start", 0.0) > 0.0 for f in base)
    for family in result["families"]:
        assert {"rewards/margins", "rewards/accuracies", "logps/real_per_token"} <= set(base[family])
        assert "rewards/margins" not in summary["sft"]["diagnostics"][family]  # sft has no pairs
        assert result["start_logps"][family] < 0.0
        change = base[family]["logps/real_per_token"] - result["start_logps"][family]
        assert base[family]["real_per_token_change"] == pytest.approx(change)


def test_a_second_invocation_reuses_every_run(quality, result, tmp_path):
    """Runs and the SFT start are cached by their settings, so an interrupted benchmark resumes; a changed
    setting reruns."""
    result, out = result
    files = sorted(out.glob("runs/*/*/seed-0/result.json")) + [out / "sft" / "model.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = quality.run_benchmark(tiny_settings(quality, out), log=lambda *_: None)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again["summary"]["sapo-dpo"]["overall"] == result["summary"]["sapo-dpo"]["overall"]
    spec = quality.RunSpec("main", "sft", "sft", 0, 1e-4, 0.1, "heldout")
    settings = tiny_settings(quality, out, steps=3)
    assert quality.run_key(spec, settings) != quality.run_key(spec, tiny_settings(quality, out))


def test_workers_run_each_spec_in_a_subprocess(quality, result):
    result, out = result
    settings = tiny_settings(quality, out, workers=2, recipes=("sft",), ablations=())
    spec = quality.RunSpec("grid", "sft-probe", "sft", 0, 1e-4, 0.1, "dev")
    (run,) = quality.run_all([spec], settings, log=lambda *_: None)
    assert run["name"] == "sft-probe" and (out / spec.directory / "result.json").is_file()
    assert run["key"] == quality.run_key(spec, settings)
    job = out / spec.directory / "job.json"
    stamp = job.stat().st_mtime_ns
    (again,) = quality.run_all([spec], settings, log=lambda *_: None)
    assert again == run and job.stat().st_mtime_ns == stamp  # a cached run starts no worker


def test_summary_is_mean_and_sample_std_over_seeds(quality):
    stats = quality._stats([0.2, 0.4])
    assert stats["mean"] == pytest.approx(0.3) and stats["std"] == pytest.approx(0.1414213562)
    assert quality._cell(stats) == "0.300 ± 0.141"
    assert quality._cell(quality._stats([0.5])) == "0.500"


def test_score_at_equal_time_interpolates_the_curve(quality):
    curve = [{"seconds": 0.0, "overall": 0.5}, {"seconds": 10.0, "overall": 0.6}, {"seconds": 30.0, "overall": 0.2}]
    assert quality.score_at_time(curve, 5.0) == pytest.approx(0.55)
    assert quality.score_at_time(curve, 20.0) == pytest.approx(0.4)
    assert quality.score_at_time(curve, 99.0) == 0.2


def test_choose_takes_the_best_dev_score_first_on_ties(quality):
    grid = [{"recipe": "dpo", "learning_rate": lr, "beta": b, "final": {"overall": s}}
            for lr, b, s in ((1e-4, 0.1, 0.3), (1e-4, 0.5, 0.4), (2e-4, 0.1, 0.4))]
    assert quality.choose(grid) == {"dpo": (1e-4, 0.5)}


def test_quick_preset_and_overrides(quality):
    quick = quality.settings_from_args(["--quick", "--out", "x", "--seeds", "3", "4"])
    assert quick.out == "x" and quick.seeds == (3, 4)
    assert quick.steps == quality.QUICK["steps"] and len(quality.QUICK["seeds"]) >= 2
    full = quality.settings_from_args(["--full"])
    assert full == quality.Settings() and len(full.seeds) >= 3 and full.recipes == quality.RECIPES


@pytest.mark.parametrize("field, value, message", [("recipes", ("sft", "kto"), "unknown recipe"),
                                                   ("ablations", ("no-such",), "unknown ablation")])
def test_unknown_names_are_rejected_before_training(quality, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        quality.run_benchmark(tiny_settings(quality, tmp_path, **{field: value}))
    assert not (tmp_path / "sft").exists()


def test_a_one_point_grid_is_not_run(quality, tmp_path):
    settings = tiny_settings(quality, tmp_path, grid_learning_rates=(3e-4,), grid_betas=(0.2,))
    grid, chosen = quality.tune(settings, log=lambda *_: None)
    assert grid == [] and chosen == dict.fromkeys(RECIPES, (3e-4, 0.2))
    assert not (tmp_path / "runs").exists()
    table = quality._tuning_text({"grid": [], "settings": dataclasses.asdict(settings)}, "")
    assert table == "One setting for every recipe, not tuned: lr 0.0003, beta 0.2"
