"""The outputs people read: table.md's text and tables, curves.png and diagnostics.png."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sapo import metrics as m

from .diagnostics import census_mean
from .settings import ABLATION_TEXT, BASE, START


def _cell(stats: dict[str, Any], digits: int = 3) -> str:
    if not stats["values"]:
        return "—"
    if len(stats["values"]) == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    s, summary = result["settings"], result["summary"]
    pinned_here = set(result.get("pinned", ()))
    chosen = ", ".join(f"{r} lr {lr:g}" + ("" if r == "sft" else f" beta {b:g}")
                       + (f" (at the grid's {result['at_edge'][r]} edge)" if result["at_edge"].get(r) else "")
                       + (" (pinned, not tuned here)" if r in pinned_here and result["grid"] else "")
                       for r, (lr, b) in result["chosen"].items())
    ablation_base = s.get("ablation_base", BASE)
    base = next((label for label, row in summary.items() if row["group"] == "main" and row["name"] == ablation_base),
                None)
    ablations = [label for label, row in summary.items() if row["group"] == "ablation"]
    lines = [*_start_text(result), "",
             f"Held-out judge score ({s['n_heldout']} new-side prompts, greedy, partial credit) after {s['steps']} "
             f"optimizer steps of batch {s['batch_size']} on the {s['n_train']} new demonstrations "
             f"({s['warmup_steps']} warm-up steps, then {s['lr_scheduler']} schedule); mean ± std over seeds "
             f"{', '.join(map(str, s['seeds']))}. {_tuning_text(result, chosen)}. SAPO: segment G = "
             f"{s['token_generate_length']} tokens, temperature {s['temperature']:g}, reference refreshed every "
             f"{s['ref_update_steps']} steps. Equal time = the score interpolated at the training time of the "
             "fastest recipe of the same seed.", "",
             "Recipes:", "", *_score_table(result, [label for label, row in summary.items() if row["group"] == "main"])]
    if ablations:
        seeds = s["ablation_seeds"] or s["seeds"]
        lines += ["", f"Ablations of {ablation_base} (its chosen setting; seeds {', '.join(map(str, seeds))}):", "",
                  *_score_table(result, ([base] if base else []) + ablations)]
    lines += ["", "Movement and signal (mean over seeds): the real answers' per-token log-likelihood change on "
              f"{s['diagnostic_per_family']} new training records per family; the parameter distance from the "
              "start (L2, and relative to the start's norm); the margin (log p(y) - log p0(y)) - (log p(y-) - "
              "log p0(y-)) against the FIXED start p0 on its own non-identical rewrites of those records, and its "
              "accuracy; what sapo logged during training: rewrites identical to the real answer before "
              "handling, ties (margin exactly 0), pairs dropped, pairs the judge scored not worse, optimizer "
              "steps skipped for lack of signal.", "", *_movement_table(summary),
              "", "Per family (mean over seeds): the same fixed-pair figures; for SAPO runs the census of the final "
              "generator's rewrites of those records (identical, judged worse) and of the final replay buffer "
              "(segment start as a fraction of the response, judged worse).", "", *_family_table(result)]
    return "\n".join(lines) + "\n"


def _start_text(result: dict[str, Any]) -> list[str]:
    s, sft, families, start = result["settings"], result["sft"], result["families"], result["start"]
    own = ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["dev_curve"])
    new = ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["new_dev_curve"])
    temperatures = list(result["start_census"])
    lines = [f"Start: one SFT checkpoint ({sft['parameters']:,} parameters) trained for {s['sft_steps']} steps of "
             f"batch {s['sft_batch_size']} (cosine from {s['sft_learning_rate']:g}) on {s['n_start']} demonstrations "
             f"of the start's side (split rule {s['split_rule']!r}); dev score by step on its own side: {own}; on "
             f"the new side: {new}. The recipes train on {s['n_train']} new demonstrations, disjoint from the "
             "start's.", "",
             "The start on the new side: held-out score, and its segment rewrites of the new training answers (as "
             "SAPO's generator makes them, before any handling): identical to the real answer, per temperature, "
             "and judged worse than it at the base temperature:", "",
             "| | overall | " + " | ".join(families) + " |", "|---|" + "---|" * (len(families) + 1),
             f"| held-out score | {start['overall']:.3f} | " + " | ".join(f"{start[f]:.3f}" for f in families) + " |"]
    for temperature in temperatures:
        census = result["start_census"][temperature]
        lines.append(f"| identical, T {temperature} | {census_mean(census, 'identical'):.3f} | "
                     + " | ".join(_number(census.get(f, {}).get("identical")) for f in families) + " |")
    base = result["start_census"].get(f"{s['temperature']:g}")
    if base:
        lines.append(f"| judged worse, T {s['temperature']:g} | {census_mean(base, 'judged_worse'):.3f} | "
                     + " | ".join(_number(base.get(f, {}).get("judged_worse")) for f in families) + " |")
    return lines


def _score_table(result: dict[str, Any], labels: Sequence[str]) -> list[str]:
    families, summary = result["families"], result["summary"]
    lines = ["| run | overall (equal steps) | " + " | ".join(families)
             + " | equal time | win rate vs start | length | train s/run |",
             "|---|" + "---|" * (len(families) + 5),
             f"| {START} | {result['start']['overall']:.3f} | "
             + " | ".join(f"{result['start'][f]:.3f}" for f in families)
             + f" | — | — | {result['start']['mean_length']:.1f} | — |"]
    for label in labels:
        row = summary[label]
        name = label if row["group"] == "main" else f"{label}: {ABLATION_TEXT.get(row['name'], '')}"
        lines.append(f"| {name} | {_cell(row['overall'])} | " + " | ".join(_cell(row[f]) for f in families)
                     + f" | {_cell(row['at_equal_time'])} | {_cell(row['win_vs_start'])} | "
                     f"{_cell(row['mean_length'], 1)} | {row['seconds']['mean']:.0f} |")
    return lines


MOVEMENT = (("real_change", "Δ real logp/token"), ("distance", "distance"), ("relative_distance", "relative"),
            ("margin", "fixed-ref margin"), ("accuracy", "accuracy"),
            (m.SEGMENT_IDENTICAL_FRACTION, "identical (logged)"), (m.REWARD_TIES, "ties"),
            (m.PAIRS_DROPPED, "pairs dropped"), (m.PAIRS_JUDGED_NOT_WORSE, "judged not worse"),
            (m.NO_SIGNAL_SKIPPED_STEPS, "steps skipped"))


def _movement_table(summary: dict[str, Any]) -> list[str]:
    lines = ["| run | " + " | ".join(title for _, title in MOVEMENT) + " |", "|---|" + "---|" * len(MOVEMENT)]
    for label, row in summary.items():
        cells = [row["moved"].get(name, {"values": []}) for name, _ in MOVEMENT]
        lines.append(f"| {label} | " + " | ".join(_cell(c, 4 if i < 3 else 3) if c["values"] else "—"
                                                  for i, c in enumerate(cells)) + " |")
    return lines


PER_FAMILY = (("real_change", "Δ real logp/token"), ("margin", "fixed-ref margin"), ("accuracy", "accuracy"),
              ("census/identical", "identical (end)"), ("census/judged_worse", "judged worse (end)"),
              ("buffer/segment_start", "segment start"), ("buffer/judged_worse", "buffer judged worse"))


def _family_table(result: dict[str, Any]) -> list[str]:
    lines = ["| run | family | " + " | ".join(title for _, title in PER_FAMILY) + " |",
             "|---|---|" + "---|" * len(PER_FAMILY)]
    for label, row in result["summary"].items():
        for family in result["families"]:
            values = row["diagnostics"].get(family, {})
            lines.append(f"| {label} | {family} | "
                         + " | ".join(_number(values.get(name), 4 if name == "real_change" else 3)
                                      for name, _ in PER_FAMILY) + " |")
    return lines


def _tuning_text(result: dict[str, Any], chosen: str) -> str:
    s = result["settings"]
    if not result["grid"]:
        return f"Not tuned: one setting per recipe, {chosen}"
    tried = sorted({g["learning_rate"] for g in result["grid"]})
    starts = "; ".join(s.get("recipe_learning_rates", ()))
    return (f"Learning rate and beta chosen per recipe on the dev split from lr "
            f"{{{', '.join(f'{v:g}' for v in s['grid_learning_rates'])}}}{f' ({starts})' if starts else ''} x beta "
            f"{{{', '.join(f'{v:g}' for v in s['grid_betas'])}}}, widened past an edge holding the best score "
            f"(tried: {', '.join(f'{v:g}' for v in tried)}): {chosen}")


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Held-out score vs step (mean over seeds, band ± std), overall and per family; the SFT dev curves first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = ["overall", *result["families"]]
    figure = Figure(figsize=(4.0 * (len(keys) + 1), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(keys) + 1, squeeze=False)[0]
    for name, style in (("dev_curve", "-"), ("new_dev_curve", ":")):
        curve = result["sft"][name]
        axes[0].plot([p["step"] for p in curve], [p["overall"] for p in curve], marker="o", markersize=3,
                     linestyle=style, label="start's side" if name == "dev_curve" else "new side")
    axes[0].set_title("SFT start: dev score (overall)", fontsize="medium")
    axes[0].set_xlabel("SFT step")
    axes[0].legend(fontsize="small")
    for ax, key in zip(axes[1:], keys, strict=True):
        for index, (label, runs) in enumerate(_groups(result).items()):
            steps = [p["step"] for p in runs[0]["curve"]]
            per_step = [[run["curve"][i][key] for run in runs] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in per_step]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
            color = f"C{index % 10}"
            ax.plot(steps, mean, label=label, color=color, marker="o", markersize=3, linewidth=1.5,
                    linestyle="-" if runs[0]["group"] == "main" else ":")
            ax.fill_between(steps, [m - d for m, d in zip(mean, std, strict=True)],
                            [m + d for m, d in zip(mean, std, strict=True)], color=color, alpha=0.10, linewidth=0)
        ax.set_title(f"held-out: {key}", fontsize="medium")
        ax.set_xlabel("optimizer step after SFT")
        ax.grid(True, alpha=0.3)
    axes[1].set_ylabel("judge score (mean over seeds)")
    axes[1].legend(fontsize="x-small")
    figure.savefig(path, format="png")
    return path


def _groups(result: dict[str, Any]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault(run["name"] if run["group"] == "main" else f"ablation: {run['name']}", []).append(run)
    return groups


def probe_curve(runs: Sequence[dict], family: str | None, name: str) -> tuple[list[int], list[float]]:
    """(steps, mean over runs) of one fixed-pair diagnostic (of `family`, or run-level when None); 0 at step 0."""
    by_step: dict[int, list[float]] = {0: [0.0]}
    for run in runs:
        for point in run["curve"]:
            probe = point.get("probe")
            if probe is None:
                continue
            value = probe[name] if family is None else probe["families"].get(family, {}).get(name, math.nan)
            if math.isfinite(value):
                by_step.setdefault(point["step"], []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[step]) for step in steps]


def plot_diagnostics(result: dict[str, Any], path: Path) -> Path:
    """Over training (mean over seeds): per family the fixed-start margin and the real answers' per-token
    log-likelihood change, and the distance from the start, for every recipe and ablation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    families = result["families"]
    figure = Figure(figsize=(4.0 * (len(families) + 1), 7.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(families) + 1, squeeze=False)
    for index, (label, runs) in enumerate(_groups(result).items()):
        style = {"color": f"C{index % 10}", "marker": "o", "markersize": 3, "label": label,
                 "linestyle": "-" if runs[0]["group"] == "main" else ":"}
        for column, family in enumerate(families):
            axes[0][column].plot(*probe_curve(runs, family, "margin"), **style)
            axes[1][column].plot(*probe_curve(runs, family, "real_change"), **style)
        axes[0][-1].plot(*probe_curve(runs, None, "distance"), **style)
    for column, family in enumerate(families):
        axes[0][column].set_title(f"{family}: margin vs the fixed start", fontsize="medium")
        axes[1][column].set_title(f"{family}: Δ real log-likelihood / token", fontsize="medium")
    axes[0][-1].set_title("parameter distance from the start (L2)", fontsize="medium")
    axes[1][-1].axis("off")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step after SFT")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize="x-small")
    figure.savefig(path, format="png")
    return path
