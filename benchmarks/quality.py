"""Quality benchmark: every recipe from one SFT checkpoint, judged on held-out prompts of the built-in suite.

    python benchmarks/quality.py --quick            # < 10 min on 2 CPU cores (2 seeds, shorter runs)
    python benchmarks/quality.py --full             # the README's numbers (3 seeds)
    python benchmarks/quality.py --quick --out DIR  # outputs elsewhere (default runs/quality)

Protocol (identical for every recipe, so that only the recipe differs):

* Data: the built-in suite (:mod:`sapo.tasks`: arithmetic, string transformations, instruction constraints),
  drawn once with suite seed 0; train and held-out prompts never overlap (hash split). Only ``dpo`` and ``orpo``
  read the records' ``rejected`` answers (realistic mistakes); the others use the demonstrations only.
* Starting point: ONE SFT checkpoint, trained here with ``sapo.demo.train_sft_checkpoint`` on the train split
  (seed 0), saved to a directory and loaded by path by every run. It is shared by all seeds, so the seeds
  vary the post-SFT stage only (data order, EMA/SPIN sampling, segment positions) and the comparison is not
  blurred by SFT-to-SFT variance. It is evaluated once (greedy decoding is deterministic): the first table row.
* Recipes ``sft`` (more SFT on the same demonstrations), ``dpo``, ``orpo``, ``spin``, ``sapo-dpo``,
  ``sapo-orpo``: the same optimizer steps, batch size, learning rate and schedule (AdamW, linear warm-up then
  constant), beta and maximum lengths; a per-recipe learning rate can be set with ``--lr_for recipe=value``
  and is then printed in the table header.
* Evaluation: greedy decoding on the held-out prompts, scored by ``sapo.tasks.judge`` (1.0 only for a fully
  correct answer), every ``eval_every`` steps through a ``TrainerCallback`` on ``trainer.policy``; the final
  score is the one after the last step. Rows give mean ± sample standard deviation over seeds; the win rate
  is per prompt against the SFT checkpoint, a tie counting as half a win.

Outputs in ``--out``: ``results.json`` (settings, every curve, final scores and responses per run),
``table.md`` (also printed), ``curves.png`` (held-out score vs step, mean over seeds), ``sft/`` (the
checkpoint) and ``runs/RECIPE/seed-N/metrics.jsonl`` (training metrics; ``sapo plot`` reads them).
Torch runs single-threaded by default (``--threads``): the model is tiny, and on a shared 2-core machine
two intra-op threads were up to 5x slower than one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from sapo import demo, tasks
from sapo.config import SAPOConfig
from sapo.judging import evaluate, win_rates
from sapo.trainer import SAPOTrainer

RECIPES: tuple[str, ...] = ("sft", "dpo", "orpo", "spin", "sapo-dpo", "sapo-orpo")
START = "sft-checkpoint (start)"
SUITE_SEED = 0


@dataclass
class Settings:
    """Defaults are the --full run; QUICK overrides some of them."""

    out: str = "runs/quality"
    seeds: tuple[int, ...] = (0, 1, 2)
    recipes: tuple[str, ...] = RECIPES
    n_train: int = 3000
    n_heldout: int = 300
    # model and SFT warm-up (as `sapo demo`)
    hidden_size: int = 128
    num_layers: int = 4
    sft_steps: int = 600
    sft_batch_size: int = 32
    sft_learning_rate: float = 2e-3
    # the post-SFT stage, shared by every recipe
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 2e-5
    lr_for: dict[str, float] = field(default_factory=dict)  # per-recipe override; empty = one shared rate
    warmup_steps: int = 10
    beta: float = 0.1
    token_generate_length: int = 6
    spin_iterations: int = 3
    max_length: int = 128
    max_prompt_length: int = 96
    # evaluation
    eval_every: int = 25
    max_new_tokens: int = 40
    eval_batch_size: int = 100
    threads: int = 1


QUICK: dict[str, Any] = {"seeds": (0, 1), "n_heldout": 150, "sft_steps": 300, "steps": 60, "eval_every": 15}


def learning_rate_of(settings: Settings, recipe: str) -> float:
    return settings.lr_for.get(recipe, settings.learning_rate)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def held_out(model: torch.nn.Module, tokenizer: Any, records: Sequence[dict], settings: Settings) -> dict[str, Any]:
    """Greedy held-out evaluation: overall and per-family mean score, mean length, per-prompt scores."""
    result = evaluate(model, tokenizer, records, tasks.judge, max_new_tokens=settings.max_new_tokens,
                      batch_size=settings.eval_batch_size)
    families = tasks.score_responses(records, result["responses"])
    return {"overall": families.pop("overall"), "by_family": families, "mean_length": result["mean_length"],
            "scores": result["scores"], "responses": result["responses"]}


def _point(step: int, result: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "overall": result["overall"], **result["by_family"], "mean_length": result["mean_length"]}


class HeldOutCurve(TrainerCallback):
    """Evaluates ``trainer.policy`` every ``every`` optimizer steps and after the last one.

    Greedy decoding consumes no random numbers, so evaluating does not change the training run.
    """

    def __init__(self, records: Sequence[dict], settings: Settings) -> None:
        self.records, self.settings = records, settings
        self.trainer: SAPOTrainer | None = None
        self.points: list[dict[str, Any]] = []
        self.last: dict[str, Any] | None = None
        self.seconds = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.settings.eval_every == 0 or step == state.max_steps:
            started = time.perf_counter()
            self.last = held_out(self.trainer.policy, self.trainer.processing_class, self.records, self.settings)
            self.points.append(_point(step, self.last))
            self.seconds += time.perf_counter() - started


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train_sft_checkpoint(settings: Settings, records: Sequence[dict], directory: Path) -> dict[str, Any]:
    torch.manual_seed(SUITE_SEED)  # build_model leaves the caller's RNG alone, so seeding first is equivalent
    started = time.perf_counter()
    _, _, losses = demo.train_sft_checkpoint(records, directory, hidden_size=settings.hidden_size,
                                             num_layers=settings.num_layers, steps=settings.sft_steps,
                                             batch_size=settings.sft_batch_size,
                                             learning_rate=settings.sft_learning_rate, seed=SUITE_SEED)
    return {"dir": str(directory), "steps": settings.sft_steps, "loss_first": losses[0], "loss_last": losses[-1],
            "seconds": time.perf_counter() - started}


def train_recipe(recipe: str, seed: int, sft_dir: Path, suite: dict[str, list[dict]], settings: Settings,
                 start: dict[str, Any]) -> dict[str, Any]:
    out = Path(settings.out) / "runs" / recipe / f"seed-{seed}"
    args = SAPOConfig(
        output_dir=str(out), overwrite_output_dir=True, recipe=recipe, seed=seed, max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size, learning_rate=learning_rate_of(settings, recipe),
        lr_scheduler_type="constant_with_warmup", warmup_steps=settings.warmup_steps, beta=settings.beta,
        token_generate_length=settings.token_generate_length, spin_iterations=settings.spin_iterations,
        max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
        logging_steps=settings.eval_every, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )
    curve = HeldOutCurve(suite["heldout"], settings)
    started = time.perf_counter()
    trainer = SAPOTrainer(model=str(sft_dir), args=args, train_dataset=suite["train"], callbacks=[curve])
    trainer.remove_callback(PrinterCallback)  # this script prints its own progress
    curve.trainer = trainer
    trainer.train()
    final = curve.last
    if final is None:  # steps == 0
        final = held_out(trainer.policy, trainer.processing_class, suite["heldout"], settings)
    wins = win_rates({"run": final["scores"], "start": start["scores"]})["run"]["start"]
    return {"recipe": recipe, "seed": seed, "learning_rate": args.learning_rate,
            "curve": [_point(0, start), *curve.points], "final": _point(settings.steps, final),
            "win_vs_start": wins, "scores": final["scores"], "responses": final["responses"],
            "seconds": time.perf_counter() - started, "eval_seconds": curve.seconds}


# ------------------------------------------------------------------------------------------------
# Summary, table, plot
# ------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def summarise(start: dict[str, Any], runs: dict[str, list[dict[str, Any]]], families: Sequence[str]) -> dict:
    """Per row: mean/std over seeds of the final overall and per-family scores, length, win rate, time."""
    summary = {START: {"overall": _stats([start["overall"]]), "mean_length": _stats([start["mean_length"]]),
                       **{f: _stats([start["by_family"][f]]) for f in families}}}
    for recipe, recipe_runs in runs.items():
        row = {key: _stats([r["final"][key] for r in recipe_runs]) for key in ("overall", *families, "mean_length")}
        row["win_vs_start"] = _stats([r["win_vs_start"]["win_rate"] for r in recipe_runs])
        row["seconds"] = _stats([r["seconds"] for r in recipe_runs])
        summary[recipe] = row
    return summary


def _cell(stats: dict[str, Any], digits: int = 3) -> str:
    if len(stats["values"]) == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    s, families, summary = result["settings"], result["families"], result["summary"]
    rates = {recipe: s["lr_for"].get(recipe, s["learning_rate"]) for recipe in s["recipes"]}
    if len(set(rates.values())) == 1:
        lr_text = f"learning rate {s['learning_rate']:g} for every recipe"
    else:
        lr_text = "learning rate per recipe: " + ", ".join(f"{r} {rate:g}" for r, rate in rates.items())
    lines = [
        f"Held-out judge score (`sapo.tasks.judge`, greedy decoding, {s['n_heldout']} held-out prompts) after "
        f"{s['steps']} optimizer steps from one shared SFT checkpoint ({s['sft_steps']} SFT steps); every recipe: "
        f"batch {s['batch_size']}, AdamW, {lr_text}, {s['warmup_steps']} linear warm-up steps then constant, "
        f"beta {s['beta']:g}, SAPO segment {s['token_generate_length']} tokens, SPIN {s['spin_iterations']} "
        f"iterations. Mean ± sample std over seeds {', '.join(map(str, s['seeds']))} of the post-SFT stage; "
        "win rate = per prompt vs the SFT checkpoint, a tie counting as half. Length = mean response characters.",
        "",
        "| recipe | overall | " + " | ".join(families) + " | win rate vs start | length | time/run (s) |",
        "|---|" + "---|" * (len(families) + 4),
    ]
    for row, stats in summary.items():
        cells = [_cell(stats["overall"]), *(_cell(stats[f]) for f in families)]
        win = _cell(stats["win_vs_start"]) if "win_vs_start" in stats else "—"
        secs = f"{stats['seconds']['mean']:.0f}" if "seconds" in stats else "—"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {win} | {_cell(stats['mean_length'], 1)} | {secs} |")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Held-out score vs step, mean over seeds (band: ± std), overall and per family."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = ["overall", *result["families"]]
    figure = Figure(figsize=(4.2 * len(keys), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        ax.axhline(result["start"][key] if key == "overall" else result["start"]["by_family"][key],
                   color="grey", linestyle="--", linewidth=1, label=START)
        for index, (recipe, runs) in enumerate(result["runs"].items()):
            steps = [p["step"] for p in runs[0]["curve"]]
            per_step = [[run["curve"][i][key] for run in runs] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in per_step]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
            color = f"C{index % 10}"
            ax.plot(steps, mean, label=recipe, color=color, marker="o", markersize=3, linewidth=1.5)
            ax.fill_between(steps, [m - d for m, d in zip(mean, std, strict=True)],
                            [m + d for m, d in zip(mean, std, strict=True)], color=color, alpha=0.12, linewidth=0)
        ax.set_title(f"held-out score: {key}", fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("judge score (mean over seeds)")
    axes[0].legend(fontsize="small")
    seeds = result["settings"]["seeds"]
    figure.suptitle(f"Every recipe from one SFT checkpoint; mean ± std over {len(seeds)} seeds")
    figure.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def run_benchmark(settings: Settings, log=print) -> dict[str, Any]:
    """Train the SFT checkpoint and every recipe for every seed; write results.json, table.md, curves.png."""
    unknown = [r for r in settings.recipes if r not in RECIPES] + [r for r in settings.lr_for if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    if not settings.seeds or settings.steps < 1 or settings.eval_every < 1:
        raise ValueError("need at least one seed, steps >= 1 and eval_every >= 1")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    try:
        suite = tasks.make_suite(settings.n_train, settings.n_heldout, seed=SUITE_SEED)
        log(f"SFT checkpoint: {settings.sft_steps} steps on {len(suite['train'])} demonstrations")
        sft = train_sft_checkpoint(settings, suite["train"], out / "sft")
        model, tokenizer = _load(out / "sft")
        start = held_out(model, tokenizer, suite["heldout"], settings)
        log(f"  loss {sft['loss_first']:.3f} -> {sft['loss_last']:.3f} in {sft['seconds']:.0f} s; "
            f"held-out score {start['overall']:.3f}")
        runs: dict[str, list[dict[str, Any]]] = {recipe: [] for recipe in settings.recipes}
        for seed in settings.seeds:
            for recipe in settings.recipes:
                run = train_recipe(recipe, seed, out / "sft", suite, settings, start)
                runs[recipe].append(run)
                log(f"  seed {seed} {recipe:<10} score {run['final']['overall']:.3f}  win rate vs start "
                    f"{run['win_vs_start']['win_rate']:.3f}  ({run['seconds']:.0f} s, "
                    f"eval {run['eval_seconds']:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    families = list(start["by_family"])
    result = {"settings": dataclasses.asdict(settings), "families": families, "sft": sft,
              "start": {**_point(0, start), "by_family": start["by_family"], "scores": start["scores"],
                        "responses": start["responses"]},
              "runs": runs, "summary": summarise(start, runs, families),
              "seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = markdown_table(result)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot_curves(result, out / "curves.png")
    result["table"] = table
    return result


def _load(directory: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def _parse_lr_for(values: Sequence[str]) -> dict[str, float]:
    rates = {}
    for value in values:
        recipe, _, rate = value.partition("=")
        try:
            rates[recipe] = float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr_for {value!r}: expected recipe=rate") from None
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"shorter run, < 10 min on 2 cores: {QUICK}")
    mode.add_argument("--full", action="store_true", help="the README's run (the default)")
    defaults = Settings()
    for item in dataclasses.fields(Settings):
        value = getattr(defaults, item.name)
        if item.name == "lr_for":
            parser.add_argument("--lr_for", nargs="*", default=[], metavar="RECIPE=LR",
                                help="per-recipe learning rate (default: one shared --learning_rate)")
        elif isinstance(value, tuple):
            parser.add_argument(f"--{item.name}", nargs="+", type=type(value[0]), default=None,
                                help=f"(full: {' '.join(map(str, value))})")
        else:
            parser.add_argument(f"--{item.name}", type=type(value), default=None, help=f"(full: {value})")
    return parser


def settings_from_args(argv: Sequence[str]) -> Settings:
    args = build_parser().parse_args(list(argv))
    values = dataclasses.asdict(Settings())
    if args.quick:
        values.update(QUICK)
    for name in values:
        given = getattr(args, name)
        if name == "lr_for":
            if given:
                values[name] = _parse_lr_for(given)
        elif given is not None:
            values[name] = tuple(given) if isinstance(values[name], tuple) else given
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    result = run_benchmark(settings)
    print("\n" + result["table"])
    print(f"wrote {Path(settings.out) / 'table.md'}, results.json and curves.png; "
          f"wall time {result['seconds']:.0f} s ({result['seconds'] / 60:.1f} min)")
    return 0 if all(math.isfinite(r["final"]["overall"]) for runs in result["runs"].values() for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
