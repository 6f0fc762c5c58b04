"""Choosing each recipe's learning rate and beta on dev: the grid, pinned recipes, the choice, and the widening
past an edge that holds the best score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .runs import run_all
from .settings import RunSpec, Settings


def recipe_grids(settings: Settings) -> dict[str, tuple[float, ...]]:
    """Per recipe, the learning rates its grid starts from: its `recipe_learning_rates` entry, else the grid's."""
    grids = dict.fromkeys(settings.recipes, settings.grid_learning_rates)
    for entry in settings.recipe_learning_rates:
        recipe, _, rates = entry.partition("=")
        if recipe not in settings.recipes or not rates:
            raise ValueError(f"recipe_learning_rates entry {entry!r}: expected RECIPE=LR[,LR...] with RECIPE one of "
                             f"{', '.join(settings.recipes)}")
        try:
            grids[recipe] = tuple(sorted(float(rate) for rate in rates.split(",")))
        except ValueError:
            raise ValueError(f"recipe_learning_rates entry {entry!r}: {rates!r} is not a list of numbers") from None
    return grids


def pinned(settings: Settings) -> dict[str, tuple[float, float]]:
    """Recipes whose grid is one point (one learning rate, one beta): their setting, with no dev runs."""
    betas = settings.grid_betas
    return {recipe: (rates[0], betas[0]) for recipe, rates in recipe_grids(settings).items()
            if len(rates) == 1 and (len(betas) == 1 or recipe == "sft")}


def grid_specs(settings: Settings, learning_rates: dict[str, Sequence[float]] | None = None) -> list[RunSpec]:
    """Dev runs of seed 0: each recipe at each of its learning rates (default: its grid's, none when pinned) x
    beta (sft: none)."""
    seed = settings.seeds[0]
    specs = []
    grids = recipe_grids(settings)
    fixed = pinned(settings)
    for recipe in settings.recipes:
        betas = settings.grid_betas[:1] if recipe == "sft" else settings.grid_betas
        default = () if recipe in fixed else grids[recipe]
        rates = default if learning_rates is None else learning_rates.get(recipe, ())
        specs += [RunSpec("grid", f"{recipe}_lr{lr:g}_b{beta:g}", recipe, seed, lr, beta, "dev")
                  for lr in rates for beta in betas]
    return specs


def choose(grid: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per recipe, the (learning rate, beta) with the best final dev score (the first listed on a tie)."""
    best: dict[str, dict[str, Any]] = {}
    for run in grid:
        if run["recipe"] not in best or run["final"]["overall"] > best[run["recipe"]]["final"]["overall"]:
            best[run["recipe"]] = run
    return {recipe: (run["learning_rate"], run["beta"]) for recipe, run in best.items()}


def at_edge(grid: Sequence[dict[str, Any]], chosen: dict[str, tuple[float, float]]) -> dict[str, str | None]:
    """Per recipe, "low" or "high" when its chosen learning rate is the smallest or largest it was tried at
    (the optimum may lie beyond), else None."""
    edges: dict[str, str | None] = {}
    for recipe, (lr, _) in chosen.items():
        tried = sorted({run["learning_rate"] for run in grid if run["recipe"] == recipe})
        edges[recipe] = None if len(tried) < 2 else "low" if lr == tried[0] else "high" if lr == tried[-1] else None
    return edges


def widened(grid: Sequence[dict[str, Any]], chosen: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """Per recipe whose best learning rate is at an edge of those tried, the next one beyond it (the edge
    times the ratio to its neighbour, two significant digits)."""
    extra: dict[str, list[float]] = {}
    for recipe, edge in at_edge(grid, chosen).items():
        if edge is None:
            continue
        tried = sorted({run["learning_rate"] for run in grid if run["recipe"] == recipe})
        lr = tried[0] ** 2 / tried[1] if edge == "low" else tried[-1] ** 2 / tried[-2]
        extra[recipe] = [float(f"{lr:.2g}")]
    return extra


def tune(settings: Settings, log=print) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float]]]:
    """The grid's dev runs and each recipe's chosen (learning rate, beta); a one-point grid needs no runs. While a
    recipe's best learning rate is at the edge of those tried, the grid grows past it (at most `grid_widen`
    times); a recipe still at an edge afterwards is reported so."""
    fixed = pinned(settings)
    if len(fixed) == len(settings.recipes):
        log("one-point grid for every recipe, not tuned: " + ", ".join(f"{r} lr {v[0]:g}" for r, v in fixed.items()))
        return [], fixed
    if fixed:
        log("pinned, not tuned here: " + ", ".join(f"{r} lr {v[0]:g}" for r, v in fixed.items()))
    log(f"grid on dev: {len(grid_specs(settings))} runs")
    grid = run_all(grid_specs(settings), settings, log)
    for _ in range(settings.grid_widen):
        extra = widened(grid, choose(grid))
        if not extra:
            break
        log("grid widened past its edge: " + ", ".join(f"{r} lr {v[0]:g}" for r, v in extra.items()))
        grid += run_all(grid_specs(settings, extra), settings, log)
    chosen = {**fixed, **choose(grid)}
    return grid, {recipe: chosen[recipe] for recipe in settings.recipes}
