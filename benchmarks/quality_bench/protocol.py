"""The whole protocol in order: checks, the start, its census, the grid, recipes and ablations, the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .diagnostics import census_mean
from .evaluation import quiet_libraries
from .report import markdown_table, plot_curves, plot_diagnostics
from .runs import run_all
from .settings import RECIPES, SAPO_RECIPES, SPLIT_RULES, RunSpec, Settings, ablation_settings
from .start import check_signal, start_census, start_scores, train_start
from .suite import suite_of
from .summary import summarise
from .tuning import recipe_grids, tune


def main_specs(settings: Settings, chosen: dict[str, tuple[float, float]]) -> list[RunSpec]:
    return [RunSpec("main", recipe, recipe, seed, *chosen[recipe], "heldout")
            for seed in settings.seeds for recipe in settings.recipes]


def ablation_specs(settings: Settings, chosen: dict[str, tuple[float, float]]) -> list[RunSpec]:
    base = settings.ablation_base
    if base not in chosen:
        return []
    return [RunSpec("ablation", name, base, seed, *chosen[base], "heldout",
                    tuple(sorted(ablation_settings(name, settings).items())))
            for seed in settings.ablation_seeds or settings.seeds for name in settings.ablations]


def check(settings: Settings) -> None:
    """Every name and size checked before anything trains."""
    unknown = [r for r in settings.recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    for name in settings.ablations:
        ablation_settings(name, settings)
    if settings.ablations and settings.ablation_base not in set(SAPO_RECIPES) & set(settings.recipes):
        raise ValueError(f"ablation_base {settings.ablation_base!r} must be a SAPO recipe the run trains: one of "
                         f"{', '.join(r for r in settings.recipes if r in SAPO_RECIPES)}")
    recipe_grids(settings)
    if settings.split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split_rule {settings.split_rule!r}; choose from {', '.join(SPLIT_RULES)}")
    if not settings.seeds or settings.steps < 1 or settings.eval_every < 1:
        raise ValueError("need at least one seed, steps >= 1 and eval_every >= 1")


def run_benchmark(settings: Settings, log=print) -> dict[str, Any]:
    """SFT start on its split, the start's census of the new split, grid on dev, recipes and ablations on
    held-out; writes results.json, table.md, curves.png, diagnostics.png."""
    check(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        suite = suite_of(settings)
        sft = train_start(settings, suite, out / "sft", log)
        log("  dev curve (start's side): " + ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["dev_curve"]))
        log("  dev curve (new side): " + ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["new_dev_curve"]))
        census = start_census(settings, suite, out)
        log("  the start's rewrites of the new demonstrations, identical to the real answer: " + ", ".join(
            f"T {t}: {census_mean(c, 'identical'):.2f}" for t, c in census["census"].items()))
        check_signal(census, settings)
        start = start_scores(settings, suite, out / "sft")
        log(f"  held-out score of the start {start['overall']:.3f}")
        grid, chosen = tune(settings, log)
        specs = main_specs(settings, chosen) + ablation_specs(settings, chosen)
        log(f"recipes and ablations on held-out: {len(specs)} runs")
        runs = run_all(specs, settings, log)
    finally:
        torch.set_num_threads(threads)
    result = summarise(settings, sft, start, grid, chosen, runs, census)
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = markdown_table(result)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot_curves(result, out / "curves.png")
    plot_diagnostics(result, out / "diagnostics.png")
    result["table"] = table
    return result
