"""Runs into results: the curves prefixed with the start, mean and sample std over seeds, the score at equal
training time, the movement and per-family diagnostics."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

from .evaluation import curve_point
from .settings import Settings
from .tuning import at_edge, pinned


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": math.nan, "std": 0.0, "values": []}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def score_at_time(curve: Sequence[dict[str, Any]], seconds: float, key: str = "overall") -> float:
    """The curve's score at `seconds` of training, linearly interpolated between its evaluation points."""
    if seconds >= curve[-1]["seconds"]:
        return curve[-1][key]
    for before, after in zip(curve, curve[1:], strict=False):
        if before["seconds"] <= seconds <= after["seconds"]:
            span = after["seconds"] - before["seconds"]
            weight = 0.0 if span <= 0 else (seconds - before["seconds"]) / span
            return before[key] + weight * (after[key] - before[key])
    return curve[0][key]


def summarise(settings: Settings, sft: dict, start: dict, grid: Sequence[dict], chosen: dict,
              runs: Sequence[dict], census: dict[str, Any]) -> dict[str, Any]:
    from sapo.judging import win_rates

    families = list(settings.families)
    start_point = curve_point(0, 0.0, start)
    for run in runs:
        run["curve"] = [start_point, *run["curve"]]
        run["win_vs_start"] = win_rates({"run": run["scores"], "start": start["scores"]})["run"]["start"]["win_rate"]
    budgets = {seed: min(r["seconds"] for r in runs if r["group"] == "main" and r["seed"] == seed)
               for seed in settings.seeds if any(r["group"] == "main" and r["seed"] == seed for r in runs)}
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        label = run["name"] if run["group"] == "main" else f"ablation: {run['name']}"
        rows.setdefault(label, {"group": run["group"], "name": run["name"], "runs": []})["runs"].append(run)
    summary = {}
    for label, row in rows.items():
        group = row["runs"]
        timed = [score_at_time(r["curve"], budgets[r["seed"]]) for r in group if r["seed"] in budgets]
        summary[label] = {
            "group": row["group"], "name": row["name"],
            **{key: _stats([r["final"][key] for r in group]) for key in ("overall", *families, "mean_length")},
            "at_equal_time": _stats(timed), "win_vs_start": _stats([r["win_vs_start"] for r in group]),
            "seconds": _stats([r["seconds"] for r in group]),
            "moved": _moved(group), "diagnostics": _diagnostics(group, families)}
    edges = at_edge(grid, chosen) if grid else {}
    return {"settings": dataclasses.asdict(settings), "families": families, "sft": sft,
            "start": {**start_point, "scores": start["scores"], "responses": start["responses"]},
            "start_census": census["census"], "fixed_pairs": len(census["pairs"]),
            "grid": [{k: g[k] for k in ("recipe", "learning_rate", "beta", "final", "seconds")} for g in grid],
            "chosen": chosen, "at_edge": edges, "pinned": sorted(pinned(settings)), "budgets": budgets,
            "summary": summary,
            "runs": [{k: v for k, v in r.items() if k != "responses"} for r in runs]}


def _moved(group: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Run-level diagnostics, mean over seeds: distance from the start, the fixed-pair margin, accuracy and real
    log-likelihood change over all families, and the training metrics sapo logs about its pairs."""
    values: dict[str, list[float]] = {}
    for run in group:
        probe = run["final"].get("probe") or {}
        for name in ("distance", "relative_distance"):
            values.setdefault(name, []).append(probe.get(name, math.nan))
        families = (probe.get("families") or {}).values()
        for name in ("real_change", "margin", "accuracy"):
            values.setdefault(name, []).append(_finite_mean([f[name] for f in families]))
        for name, value in (run.get("logged") or {}).items():
            values.setdefault(name, []).append(value)
    return {name: _stats(v) for name, v in values.items()}


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _diagnostics(group: Sequence[dict], families: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per family, mean over seeds: the fixed-pair margin, accuracy and real log-likelihood change at the end;
    for SAPO runs the census of the final generator's rewrites and of the final replay buffer."""
    result: dict[str, dict[str, float]] = {}
    for family in families:
        values: dict[str, list[float]] = {}
        for run in group:
            for name, value in ((run["final"].get("probe") or {}).get("families", {}).get(family) or {}).items():
                values.setdefault(name, []).append(value)
            for source in ("census", "buffer"):
                for name, value in ((run.get(source) or {}).get(family) or {}).items():
                    if name not in ("n", "entries"):
                        values.setdefault(f"{source}/{name}", []).append(value)
        result[family] = {name: _stats(v)["mean"] for name, v in values.items()}
    return result
