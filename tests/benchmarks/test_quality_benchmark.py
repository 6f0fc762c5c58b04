"""benchmarks/quality.py in a drastically reduced form: the whole protocol (SFT start on its split, the start's
census of the new split, dev grid, recipes, ablations, diagnostics) with a tiny model, 2 steps, 1 seed, 8
held-out prompts; and its pure pieces."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from helpers import load_benchmark

pytestmark = pytest.mark.benchmark  # a benchmark script at tiny size; `-m "not benchmark"` skips these

RECIPES = ("sft", "dpo", "sapo-dpo", "sapo-rpo")
BASE = "sapo-dpo"
ABLATIONS = ("whole", "keep", "judge")


@pytest.fixture(scope="module")
def quality():
    yield from load_benchmark("quality")


def tiny_settings(quality, out, **overrides):
    values = dict(out=str(out), seeds=(0,), ablation_seeds=(), recipes=RECIPES, ablations=ABLATIONS, n_start=64,
                  n_train=32, n_dev=8, n_heldout=8, hidden_size=32, num_layers=2, sft_steps=4,
                  sft_batch_size=8, sft_eval_every=2,
                  steps=2, batch_size=4, warmup_steps=0, grid_learning_rates=(1e-4,), grid_betas=(0.1, 0.5),
                  eval_every=1, max_new_tokens=8, eval_batch_size=8, token_generate_length=3, ref_update_steps=1,
                  max_length=200, max_prompt_length=96, diagnostic_per_family=2, census_temperatures=(0.7, 1.0),
                  workers=1)
    values.update(overrides)
    return quality.Settings(**values)


@pytest.fixture(scope="module")
def result(quality, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    return quality.run_benchmark(tiny_settings(quality, out), log=lambda *_: None), out


def _table_rows(block: str) -> list[str]:
    return [line.split(" | ")[0][2:] for line in block.splitlines()[2:]]


def test_benchmark_writes_tables_json_and_png(quality, result):
    result, out = result
    table = (out / "table.md").read_text()
    blocks = table.split("\n\n")
    recipes = blocks[blocks.index("Recipes:") + 1]
    assert _table_rows(recipes) == [quality.START, *RECIPES]
    ablations = blocks[blocks.index(next(b for b in blocks if b.startswith("Ablations of sapo-dpo"))) + 1]
    assert _table_rows(ablations) == [quality.START, "sapo-dpo",
                                      *(f"ablation: {a}: {quality.ABLATION_TEXT[a]}" for a in ABLATIONS)]
    header, separator = recipes.splitlines()[:2]
    assert header.count("|") == separator.count("|")
    assert "| sapo-dpo | chain |" in table and "| identical, T 0.7 |" in table and "| identical, T 1 |" in table
    assert "lr {0.0001} x beta {0.1, 0.5}" in table and "after 2 optimizer steps" in table
    for figure in ("curves.png", "diagnostics.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert [p["step"] for p in saved["sft"]["dev_curve"]] == [2, 4]
    assert [p["step"] for p in saved["sft"]["new_dev_curve"]] == [2, 4]
    assert len(saved["grid"]) == 2 + 2 + 2  # 2 betas per preference recipe; sft (no beta, one lr) needs no dev run
    for run in saved["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert run["curve"][0]["overall"] == saved["start"]["overall"]  # every curve starts at the checkpoint
        assert run["final"]["overall"] == run["curve"][-1]["overall"]
        assert len(run["scores"]) == 8 and 0.0 <= run["win_vs_start"] <= 1.0
        assert [run["learning_rate"], run["beta"]] == saved["chosen"][run["recipe"]]
        assert run["final"]["probe"]["distance"] > 0.0  # every run moved the weights
    assert saved["families"] == ["chain", "listing", "profile", "format"]


def _prompts(records):
    from sapo import tasks

    return {tasks.prompt_of(r) for r in records}


def test_recipes_never_see_the_start_split(quality, result):
    """What each trainer was given (decoded from its own tokenized training set): the start only its split, every
    recipe and ablation only the new split; the two share no prompt, and the new split is the harder instances."""
    result, out = result
    suite = quality.suite_of(quality.Settings(**result["settings"]))
    start = set(json.loads((out / "sft" / "trained_prompts.json").read_text()))
    assert start == _prompts(suite["start"]) and len(start) == 64
    new = _prompts(suite["train"])
    assert not start & new and not start & _prompts(suite["heldout"]) and not start & _prompts(suite["dev"])
    runs = sorted(out.glob("runs/*/*/seed-0/trained_prompts.json"))
    assert len(runs) == len(result["grid"]) + len(RECIPES) + len(ABLATIONS)
    for path in runs:
        given = json.loads(path.read_text())
        assert set(given) == new and len(given) == 32, path
    harder = quality.HARDER_FROM
    assert all(r["params"]["n"] >= harder[r["task"]] for split in ("train", "dev", "heldout") for r in suite[split])
    assert all(r["params"]["n"] < harder[r["task"]] for r in suite["start"])


def test_the_same_rule_splits_one_distribution_by_prompt(quality, tmp_path):
    suite = quality.suite_of(tiny_settings(quality, tmp_path, split_rule="same", n_start=40, n_train=40))
    assert not _prompts(suite["start"]) & _prompts(suite["train"])
    assert len(suite["start"]) == len(suite["train"]) == 40
    sizes = {side: {r["params"]["n"] for r in suite[side] if r["task"] == "chain"} for side in ("start", "train")}
    assert sizes["start"] & sizes["train"]  # same sizes on both sides
    with pytest.raises(ValueError, match="unknown split_rule 'other'"):
        quality.suite_of(tiny_settings(quality, tmp_path, split_rule="other"))


def test_the_start_census_is_reported_per_temperature_and_family(quality, result):
    result, out = result
    census = result["start_census"]
    assert set(census) == {"0.7", "1"}
    for families in census.values():
        assert set(families) == set(result["families"])
        for values in families.values():
            assert values["n"] == 2 and 0.0 <= values["identical"] <= 1.0 and 0.0 <= values["judged_worse"] <= 1.0
    saved = json.loads((out / "sft" / "start.json").read_text())
    assert len(saved["pairs"]) == 8 == len(saved["scores"]["real"]) == result["fixed_pairs"]


def test_the_probe_measures_against_the_fixed_start(quality, result):
    """At the start itself every margin, log-likelihood change and distance is 0; moving one weight by d moves the
    distance by |d|, and the margin is the difference of the real and rejected log-probability changes."""
    import torch
    from transformers import AutoModelForCausalLM

    result, out = result
    start = json.loads((out / "sft" / "start.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "sft")
    probe = quality.probe_of(start, AutoModelForCausalLM.from_pretrained(out / "sft"))
    same = probe(model)
    assert same["distance"] == 0.0
    for values in same["families"].values():
        assert values["real_change"] == pytest.approx(0.0, abs=1e-5)
        assert math.isnan(values["margin"]) or values["margin"] == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        model.model.norm.weight[0] += 0.25
    moved = probe(model)
    assert moved["distance"] == pytest.approx(0.25) and moved["relative_distance"] > 0.0
    now = quality.fixed_pair_scores(model, start["pairs"])
    family = start["pairs"][0]["family"]
    rows = [i for i, p in enumerate(start["pairs"]) if p["family"] == family and not p["identical"]]
    if rows:
        margins = [(now["real"][i] - start["scores"]["real"][i]) - (now["rejected"][i] - start["scores"]["rejected"][i])
                   for i in rows]
        assert moved["families"][family]["margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)


def test_nothing_long_runs_when_the_start_reproduces_the_new_split(quality, result):
    """The census comes before the grid: above max_start_identical the benchmark stops, naming the figure, and
    trains nothing (the start and its census are the cached ones; steps=3 would make every run new)."""
    result, out = result
    files = sorted(out.glob("runs/*/*/seed-0/result.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    settings = tiny_settings(quality, out, max_start_identical=-0.5, steps=3)
    with pytest.raises(RuntimeError, match=r"the start rewrites \d+% of the new demonstrations into themselves"):
        quality.run_benchmark(settings, log=lambda *_: None)
    assert sorted(out.glob("runs/*/*/seed-0/result.json")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_recipes_are_tuned_on_dev_and_reported_on_heldout(quality, result):
    result, _ = result
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
    """The whole-response ablation rewrites from k = 0; the base starts segments later; SAPO runs carry the
    census of their final generator and buffer, sft none."""
    result, _ = result
    summary = result["summary"]
    whole = summary["ablation: whole"]["diagnostics"]
    base = summary["sapo-dpo"]["diagnostics"]
    starts = [whole[f]["buffer/segment_start"] for f in whole if "buffer/segment_start" in whole[f]]
    assert starts and all(start == 0.0 for start in starts)
    assert any(base[f].get("buffer/segment_start", 0.0) > 0.0 for f in base)
    for family in result["families"]:
        assert {"margin", "accuracy", "real_change", "census/identical", "census/judged_worse"} <= set(base[family])
        assert "census/identical" not in summary["sft"]["diagnostics"][family]
    assert summary["sapo-dpo"]["moved"]["segment/identical_fraction"]["values"]  # what sapo logged


def test_each_ablation_runs_with_the_settings_it_names(quality, result):
    """Read back from each run's trainer: sapo's defaults (identical rewrites resampled, steps without signal
    skipped) in the base, the paper's behaviour in `keep`, the task judge in `judge`; the judge filter logs how
    many rewrites it found not worse, and no pair in the base's buffer is identical to its real answer."""
    result, _ = result
    config = {(run["group"], run["name"]): run["config"] for run in result["runs"]}
    base = config[("main", "sapo-dpo")]
    assert (base["identical_rejected"], base["skips_no_signal_steps"], base["rejected_judge"]) == ("resample", True,
                                                                                                   None)
    keep = config[("ablation", "keep")]
    assert (keep["identical_rejected"], keep["skips_no_signal_steps"]) == ("keep", False)
    assert config[("ablation", "judge")]["rejected_judge"] == "sapo.tasks:judge"
    assert config[("ablation", "whole")]["token_generate_length"] == 200  # max_length
    assert (base["nll_weight"], config[("main", "sapo-rpo")]["nll_weight"]) == (0.0, 1.0)  # a variant of sapo-dpo
    for (group, name), values in config.items():
        assert values["learning_rate"] == result["chosen"][BASE if group == "ablation" else name][0]
    judge = next(r for r in result["runs"] if r["name"] == "judge")
    assert "pairs/judged_not_worse" in judge["logged"] and "pairs/dropped" in judge["logged"]
    for family, values in result["summary"]["sapo-dpo"]["diagnostics"].items():
        assert values.get("buffer/identical", 0.0) == 0.0, family


def test_a_second_invocation_reuses_every_run(quality, result, tmp_path):
    """Runs and the SFT start are cached by their settings, so an interrupted benchmark resumes; a changed
    setting reruns."""
    result, out = result
    files = sorted(out.glob("runs/*/*/seed-0/result.json")) + [out / "sft" / "model.safetensors",
                                                               out / "sft" / "start.json"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = quality.run_benchmark(tiny_settings(quality, out), log=lambda *_: None)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again["summary"]["sapo-dpo"]["overall"] == result["summary"]["sapo-dpo"]["overall"]
    spec = quality.RunSpec("main", "sft", "sft", 0, 1e-4, 0.1, "heldout")
    for changed in (dict(steps=3), dict(n_train=40), dict(split_rule="same")):
        settings = tiny_settings(quality, out, **changed)
        assert quality.run_key(spec, settings) != quality.run_key(spec, tiny_settings(quality, out))


def test_workers_serve_several_runs_each_in_their_own_processes(quality, result):
    """Three runs on two workers: none in this process, at most two processes, one of which served two runs;
    a cached run starts no worker."""
    import os

    result, out = result
    settings = tiny_settings(quality, out, workers=2, recipes=("sft",), ablations=())
    specs = [quality.RunSpec("grid", f"sft-probe{i}", "sft", 0, 1e-4, 0.1, "dev") for i in range(3)]
    runs = quality.run_all(specs, settings, log=lambda *_: None)
    assert [run["name"] for run in runs] == ["sft-probe0", "sft-probe1", "sft-probe2"]
    assert all(run["key"] == quality.run_key(spec, settings) for run, spec in zip(runs, specs, strict=True))
    processes = [run["process"] for run in runs]
    assert os.getpid() not in processes and len(set(processes)) < len(processes)
    jobs = [out / spec.directory / "job.json" for spec in specs]
    stamps = [job.stat().st_mtime_ns for job in jobs]
    assert quality.run_all(specs, settings, log=lambda *_: None) == runs
    assert [job.stat().st_mtime_ns for job in jobs] == stamps  # cached runs start no worker


def test_a_failed_run_reports_its_traceback(quality, result):
    result, out = result
    settings = tiny_settings(quality, out, workers=2)
    spec = quality.RunSpec("grid", "bad", "sft", 0, 1e-4, 0.1, "dev", (("no_such_setting", 1),))
    with pytest.raises(RuntimeError, match=r"(?s)run runs/grid/bad/seed-0 failed:.*no_such_setting"):
        quality.run_all([spec], settings, log=lambda *_: None)


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


def _grid(*rows):
    return [{"recipe": r, "learning_rate": lr, "beta": b, "final": {"overall": s}} for r, lr, b, s in rows]


def test_choose_takes_the_best_dev_score_first_on_ties(quality):
    grid = _grid(("dpo", 1e-4, 0.1, 0.3), ("dpo", 1e-4, 0.5, 0.4), ("dpo", 2e-4, 0.1, 0.4))
    assert quality.choose(grid) == {"dpo": (1e-4, 0.5)}


def test_the_grid_widens_past_the_edge_that_holds_the_best(quality):
    grid = _grid(("sft", 1e-4, 0.1, 0.5), ("sft", 3e-4, 0.1, 0.6), ("sft", 1e-3, 0.1, 0.7),
                 ("dpo", 1e-4, 0.1, 0.6), ("dpo", 3e-4, 0.1, 0.5), ("dpo", 1e-3, 0.1, 0.4),
                 ("orpo", 1e-4, 0.1, 0.4), ("orpo", 3e-4, 0.1, 0.6), ("orpo", 1e-3, 0.1, 0.5))
    chosen = quality.choose(grid)
    assert quality.at_edge(grid, chosen) == {"sft": "high", "dpo": "low", "orpo": None}
    assert quality.widened(grid, chosen) == {"sft": [3.3e-3], "dpo": [3.3e-5]}
    grid += _grid(("sft", 3.3e-3, 0.1, 0.65), ("dpo", 3.3e-5, 0.1, 0.7))
    chosen = quality.choose(grid)
    assert quality.at_edge(grid, chosen) == {"sft": None, "dpo": "low", "orpo": None}
    assert quality.widened(grid, chosen) == {"dpo": [1.1e-5]}


def test_a_grid_still_at_its_edge_says_so(quality, tmp_path):
    result = {"settings": dataclasses.asdict(tiny_settings(quality, tmp_path)), "at_edge": {"dpo": "low"},
              "grid": _grid(("dpo", 1e-4, 0.1, 0.6), ("dpo", 3e-4, 0.1, 0.5)), "chosen": {"dpo": (1e-4, 0.1)}}
    chosen = "dpo lr 0.0001 beta 0.1 (at the grid's low edge)"
    assert "(tried: 0.0001, 0.0003)" in quality._tuning_text(result, chosen)


def test_quick_preset_and_overrides(quality):
    quick = quality.settings_from_args(["--quick", "--out", "x", "--seeds", "3", "4"])
    assert quick.out == "x" and quick.seeds == (3, 4)
    assert quick.steps == quality.QUICK["steps"] and len(quality.QUICK["seeds"]) >= 2
    full = quality.settings_from_args(["--full"])
    assert full == quality.Settings() and len(full.seeds) >= 3 and full.recipes == quality.RECIPES
    assert len(full.grid_learning_rates) >= 3 and full.grid_widen >= 1
    assert {"keep", "no-skip", "whole", "no-ema", "T0.3", "T1", "judge"} <= set(full.ablations)


@pytest.mark.parametrize("field, value, message", [("recipes", ("sft", "kto"), "unknown recipe"),
                                                   ("ablations", ("no-such",), "unknown ablation"),
                                                   ("split_rule", "other", "unknown split_rule")])
def test_unknown_names_are_rejected_before_training(quality, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        quality.run_benchmark(tiny_settings(quality, tmp_path, **{field: value}))
    assert not (tmp_path / "sft").exists()


def test_a_one_point_grid_is_not_run(quality, tmp_path):
    settings = tiny_settings(quality, tmp_path, grid_learning_rates=(3e-4,), grid_betas=(0.2,))
    grid, chosen = quality.tune(settings, log=lambda *_: None)
    assert grid == [] and chosen == dict.fromkeys(RECIPES, (3e-4, 0.2))
    assert not (tmp_path / "runs").exists()
    table = quality._tuning_text({"grid": [], "settings": dataclasses.asdict(settings)}, "sft lr 0.0003")
    assert table == "Not tuned: one setting per recipe, sft lr 0.0003"


def test_a_recipe_grid_of_its_own_or_a_pinned_setting(quality, tmp_path):
    """`--recipe_learning_rates`: one rate pins a recipe (no dev run), several start its own grid; the others
    keep the common grid."""
    settings = quality.settings_from_args(["--out", str(tmp_path), "--recipes", *RECIPES,
                                           "--recipe_learning_rates", "sft=9e-4", "dpo=3e-5,1e-5"])
    assert settings.recipe_learning_rates == ("sft=9e-4", "dpo=3e-5,1e-5")
    assert quality.pinned(settings) == {"sft": (9e-4, 0.1)}
    runs = {(spec.recipe, spec.learning_rate) for spec in quality.grid_specs(settings)}
    common = {(recipe, lr) for recipe in RECIPES[2:] for lr in settings.grid_learning_rates}
    assert runs == {("dpo", 1e-5), ("dpo", 3e-5), *common}
    for bad in ("kto=1e-4", "sft=", "sft=fast"):
        with pytest.raises(ValueError, match="recipe_learning_rates entry"):
            quality.check(dataclasses.replace(settings, recipe_learning_rates=(bad,)))


def test_ablations_can_start_from_another_sapo_recipe(quality, tmp_path):
    """`--ablation_base`: the ablations change one part of the named SAPO recipe, at its chosen setting."""
    settings = tiny_settings(quality, tmp_path, recipes=("sft", "sapo-dpo", "sapo-orpo"), ablation_base="sapo-orpo")
    chosen = {"sft": (1e-3, 0.1), "sapo-dpo": (3e-5, 0.1), "sapo-orpo": (9e-4, 0.05)}
    specs = quality.ablation_specs(settings, chosen)
    assert specs and {(s.recipe, s.learning_rate, s.beta) for s in specs} == {("sapo-orpo", 9e-4, 0.05)}
    assert {s.name for s in specs} == set(ABLATIONS)
    for base in ("sft", "sapo-rpo"):  # not a SAPO recipe; not one this run trains
        with pytest.raises(ValueError, match="ablation_base"):
            quality.check(dataclasses.replace(settings, ablation_base=base))
