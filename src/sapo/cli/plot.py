"""`sapo plot`: training curves of one or more SAPO runs from their `metrics.jsonl`.

Each run's `output_dir/metrics.jsonl` has one JSON object per logging step (see `SAPOTrainer.log`).
Rows with a `loss` are training rows, rows with `eval_*` keys evaluation rows (held-out data, see
`sapo.heldout`); they are plotted against `step`, one PNG per group of metrics, with the runs overlaid
(legend: run directory name, and the eval set's name for runs evaluated on several named sets). A run
resumed from a checkpoint appends rows for steps it already logged; the row written last wins for each step.
Files are read by `sapo.metrics.read_metrics` (its torn-line rule, and the metric names of an older sapo read as
today's, so old and new runs overlay).

matplotlib is optional (`pip install 'sapo-align[plot]'`) and only imported when plotting; figures are drawn
with the Agg canvas directly, so pyplot's global state and the user's backend are never touched.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapo import metrics as m
from sapo.errors import UsageError
from sapo.metrics import EVAL_PREFIX, eval_name, read_metrics
from sapo.run.paths import METRICS_FILE

__all__ = ["FIGURES", "FigureSpec", "load_metrics", "main", "plot_runs"]

@dataclass(frozen=True)
class FigureSpec:
    """One PNG (`name`.png): a row of panels, one metric per panel, all runs overlaid in each."""

    name: str
    title: str
    panels: tuple[tuple[str, str], ...]  # (metric key, panel title)


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("loss", "Training loss", ((m.LOSS, "loss"), (m.NLL_LOSS, "NLL of the real response (ORPO, sft)"))),
    FigureSpec("rewards", "Implicit rewards", ((m.REWARDS_CHOSEN, "chosen (the real response)"),
                                               (m.REWARDS_REJECTED, "rejected"),
                                               (m.REWARD_MARGINS, "margin (chosen - rejected)"))),
    FigureSpec("accuracy", "Reward accuracy",
               ((m.REWARD_ACCURACIES, "fraction with reward(chosen) > reward(rejected), ties apart"),
                (m.REWARD_TIES, "fraction of ties (rejected = chosen)"))),
    FigureSpec("tokens", "Token statistics of the policy",
               ((m.LOGITS_CHOSEN, "mean logit, chosen"), (m.LOGITS_REJECTED, "mean logit, rejected"),
                (m.ENTROPY, "entropy (nats per token)"),
                (m.MEAN_TOKEN_ACCURACY, "chosen tokens that are the argmax"))),
    FigureSpec("buffer", "Replay buffer", ((m.BUFFER_SIZE, "fill (entries)"),
                                           (m.BUFFER_MEAN_TIMES_SAMPLED, "sample reuse (mean times sampled)"))),
    FigureSpec("segment", "Regenerated segment",
               ((m.SEGMENT_REPLACED_LENGTH, "replaced length (tokens)"),
                (m.SEGMENT_IDENTICAL_FRACTION, "fraction identical to the real"),
                (m.PAIRS_DROPPED, "rewrites dropped without signal (total)"),
                (m.NO_SIGNAL_SKIPPED_STEPS, "steps skipped without signal (total)"))),
    FigureSpec("generation_share", "Generation time",
               ((m.GENERATION_SHARE, "share of step time spent generating"),)),
    FigureSpec("eval", "Held-out evaluation (eval pairs fixed for the run)",
               ((eval_name(m.LOSS), "loss"), (eval_name(m.REWARD_MARGINS), "margin (chosen - rejected)"),
                (eval_name(m.REWARD_ACCURACIES), "fraction with reward(chosen) > reward(rejected)"),
                (eval_name(m.LOGPS_CHOSEN_PER_TOKEN), "log-likelihood per token of the real responses"),
                (eval_name(m.JUDGE_SCORE), "judge score"))),
)
FRACTIONS = {m.REWARD_ACCURACIES, m.REWARD_TIES, m.MEAN_TOKEN_ACCURACY, m.SEGMENT_IDENTICAL_FRACTION,
             m.GENERATION_SHARE, eval_name(m.REWARD_ACCURACIES)}
"""Metrics in [0, 1]: their panels get a fixed axis."""


def _metrics_path(run: Path) -> Path:
    return run if run.is_file() or run.suffix == ".jsonl" else run / METRICS_FILE


def load_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Training rows (those with a `loss`) and evaluation rows (`eval_*` keys) of a run directory's metrics.jsonl,
    or of that file itself, read by `sapo.metrics.read_metrics`.

    Raises ValueError naming the file when it is missing, empty, or has neither training nor evaluation rows.
    """
    path = _metrics_path(Path(run))
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a SAPO output_dir has metrics.jsonl after its first log step)")
    rows = [row for row in read_metrics(path)
            if m.LOSS in row or any(str(key).startswith(EVAL_PREFIX) for key in row)]
    if not rows:
        what = "is empty" if not path.read_bytes().strip() else \
            "has no training rows (with 'loss') and no evaluation rows (with 'eval_' keys)"
        raise ValueError(f"{path}: {what}")
    return rows


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, sorted by step, the last row winning for a repeated step."""
    by_step: dict[float, float] = {}
    for row in rows:
        step, value = row.get(m.STEP), row.get(key)
        if _is_number(step) and _is_number(value):
            by_step[float(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _named_series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[str, list[float], list[float]]]:
    """(eval set name, steps, values) of a metric: one series, named "", for a training metric or a single eval set;
    for an eval metric also one per named eval set (`eval_<name>_loss` for `eval_loss`, as Trainer names them)."""
    if not key.startswith(EVAL_PREFIX):
        return [("", *_series(rows, key))]
    metric = key[len(EVAL_PREFIX):]
    names = sorted({str(k)[len(EVAL_PREFIX):-len(metric) - 1] for row in rows for k in row
                    if str(k).startswith(EVAL_PREFIX) and str(k).endswith(f"_{metric}")
                    and len(str(k)) > len(key) + 1})
    keys = [("", key)] + [(name, f"{EVAL_PREFIX}{name}_{metric}") for name in names]
    return [(name, *_series(rows, named_key)) for name, named_key in keys]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_labels(paths: Sequence[Path]) -> list[str]:
    """Run directory names; the full path where two runs share a name."""
    names = [(p.parent if p.is_file() or p.suffix == ".jsonl" else p).resolve().name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'sapo-align[plot]'") from error
    return MplFigure, FigureCanvasAgg


def plot_runs(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write one PNG per metric group present in any run to ``out_dir``; returns the paths written.

    ``run_dirs`` are SAPO output directories (or their metrics.jsonl files). Panels whose metric no run
    logged are left out, and so are figures with no panel left.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    paths = [Path(r) for r in run_dirs]
    runs = list(zip(_run_labels(paths), [load_metrics(p) for p in paths], strict=True))
    mpl_figure, canvas_class = _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in FIGURES:
        panels = [(key, title, [(f"{label} [{name}]" if name else label, steps, values) for label, rows in runs
                                for name, steps, values in _named_series(rows, key)])
                   for key, title in spec.panels]
        panels = [(key, title, series) for key, title, series in panels if any(steps for _, steps, _ in series)]
        if not panels:
            continue
        figure = mpl_figure(figsize=(5.0 * len(panels), 3.6), dpi=100, layout="constrained")
        canvas_class(figure)
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for ax, (key, title, series) in zip(axes, panels, strict=True):
            for index, (label, steps, values) in enumerate(series):
                if steps:
                    ax.plot(steps, values, label=label, color=f"C{index % 10}", linewidth=1.5,
                            marker="o" if len(steps) <= 20 else None, markersize=3)
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("step")
            ax.set_ylabel(key, fontsize="small")
            ax.grid(True, alpha=0.3)
            if _fraction_metric(key, series):
                ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize="small")
        figure.suptitle(spec.title)
        path = out / f"{spec.name}.png"
        figure.savefig(path, format="png")
        written.append(path)
    return written


def _fraction_metric(key: str, series: Sequence[tuple[str, list[float], list[float]]]) -> bool:
    """Fractions in [0, 1] get a fixed axis so runs and time ranges compare at a glance."""
    if key not in FRACTIONS:
        return False
    values = [v for _, _, vs in series for v in vs if not math.isnan(v)]
    return all(0.0 <= v <= 1.0 for v in values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapo plot",
                                     description="Plot training curves of SAPO runs from their metrics.jsonl.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="SAPO output directories to overlay")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs "
                        "(default: RUN_DIR/plots of the first run)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    first = Path(args.run_dirs[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first) / "plots"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: cannot be created, {existing} is a file")
    try:
        paths = plot_runs(args.run_dirs, out)
    except (ImportError, ValueError, OSError) as error:
        raise UsageError(str(error)) from None
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
