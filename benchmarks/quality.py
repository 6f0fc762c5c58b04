"""Quality benchmark: SAPO against its peers from one converged SFT checkpoint, with ablations of SAPO's parts.

    python benchmarks/quality.py --quick            # < 10 min on 2 CPU cores: the same protocol, reduced
    python benchmarks/quality.py --full             # the README's numbers
    python benchmarks/quality.py --full --out DIR   # outputs elsewhere (default runs/quality, runs/quality-quick)

Protocol (identical for every run, so that only the recipe or the ablated part differs):

* Data: the structured task families of :mod:`sapo.tasks` (``chain``: worked multi-step sums; ``listing``:
  numbered sorts and reversals; ``profile``: facts as sentences; ``format``: lines under several checkable
  constraints). Answers are 25-150 characters, i.e. 25-150 tokens of the character-level tokenizer, and each
  family's judge gives partial credit, so one wrong step costs a fraction. Train, dev and held-out prompts are
  disjoint by hash; settings are chosen on dev, the table is held-out.
* Start: ONE SFT checkpoint (tiny Llama, ``hidden_size`` x ``num_layers``), trained on the train split with a
  cosine schedule while its dev score is measured every ``sft_eval_every`` steps (the SFT curve). It is shared
  by every run, and cached in ``OUT/sft`` for later invocations with the same settings.
* Recipes from that checkpoint: ``sft`` (continued SFT: if it still gains, the start was not converged),
  ``dpo`` and ``orpo`` (offline, on the records' near-miss ``rejected`` answers), ``spin``, ``sapo-dpo``,
  ``sapo-orpo``. Equal optimizer steps, batch, schedule (AdamW, linear warm-up then linear decay to 0, as in the
  paper) and lengths.
* Grid: each recipe's learning rate and beta are chosen on the dev split (seed 0) from the same grid
  (``grid_learning_rates`` x ``grid_betas``; sft has no beta). The chosen pair is then run with every seed
  and judged on held-out prompts.
* Ablations of SAPO's parts, each from the base (``sapo-dpo`` with its chosen settings), same seeds and steps:
  the segment rewrite against a whole-response rewrite (k = 0, G = len(y)), segment lengths G, the EMA
  generator against the current policy (ema_beta = 0), the replay buffer against fresh pairs only (buffer = one
  batch, generated every step), and the reference refresh modes (ema / policy / fixed).
* Evaluation: greedy decoding, scored by ``sapo.tasks.judge``, every ``eval_every`` steps and after the last.
  Scores are at equal steps (the last step) and at equal wall time (interpolated on the curve at the training
  time of the fastest recipe of the same seed; evaluation time excluded). Win rates are per held-out prompt
  against the start, a tie counting half. Rows give mean ± sample std over seeds.
* Diagnostics: reward margins and accuracies and the real answers' per-token log-likelihood over training, per
  family, on fixed dev pairs (the trainer's own evaluation, ``eval_dataset`` by family); for SAPO runs, from
  the final replay buffer: the fraction of rejected answers equal to the real one, where the segment starts
  (fraction of the response), and the fraction the judge scores below the real answer.

Outputs in ``--out``: ``results.json`` (settings, SFT curve, grid, every run), ``table.md`` (also printed),
``curves.png``, ``sft/`` (the checkpoint) and ``runs/GROUP/NAME/seed-N/`` (each run's ``result.json``, which a
later invocation reuses when its settings match, and ``metrics.jsonl``, which ``sapo plot`` reads). Runs go to
``--workers`` processes with one torch thread each (on a shared 2-core machine two intra-op threads were up to
5x slower than one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RECIPES: tuple[str, ...] = ("sft", "dpo", "orpo", "spin", "sapo-dpo", "sapo-orpo")
SAPO_RECIPES = ("sapo-dpo", "sapo-orpo")
BASE = "sapo-dpo"  # the recipe the ablations start from
START = "sft checkpoint (start)"
SUITE_SEED = 0


@dataclass
class Settings:
    """Defaults are the --full run; QUICK overrides some of them."""

    out: str = "runs/quality"
    seeds: tuple[int, ...] = (0, 1, 2)
    recipes: tuple[str, ...] = RECIPES
    ablations: tuple[str, ...] = ("whole", "G12", "no-ema", "no-replay", "ref-policy", "ref-fixed", "T1")
    families: tuple[str, ...] = ("chain", "listing", "profile", "format")
    n_train: int = 6000
    n_dev: int = 200
    n_heldout: int = 300
    # model and the SFT start
    hidden_size: int = 128
    num_layers: int = 4
    sft_steps: int = 1500
    sft_batch_size: int = 32
    sft_learning_rate: float = 2e-3
    sft_eval_every: int = 250
    # the post-SFT stage, shared by every run
    steps: int = 100
    batch_size: int = 16
    warmup_steps: int = 10
    lr_scheduler: str = "linear"  # warm-up, then linear decay to 0 at the last step (the paper's schedule)
    grid_learning_rates: tuple[float, ...] = (1e-5, 3e-5, 1e-4)
    grid_betas: tuple[float, ...] = (0.1, 0.5)
    token_generate_length: int = 24
    ref_update_steps: int = 50
    spin_iterations: int = 3
    max_length: int = 256
    max_prompt_length: int = 96
    # evaluation
    eval_every: int = 50
    max_new_tokens: int = 160
    eval_batch_size: int = 100
    diagnostic_per_family: int = 24
    workers: int = 2


QUICK: dict[str, Any] = {
    "seeds": (0, 1), "ablations": ("whole", "no-ema"), "n_train": 3000, "n_dev": 80, "n_heldout": 80,
    "sft_steps": 250, "sft_eval_every": 125, "steps": 24, "eval_every": 24, "grid_learning_rates": (3e-5,),
    "grid_betas": (0.1,), "ref_update_steps": 12, "diagnostic_per_family": 8,
}
"""--quick: the same protocol reduced (a one-point grid is not run; its point is every recipe's setting)."""


def ablation_settings(name: str, settings: Settings) -> dict[str, Any]:
    """SAPOConfig overrides of one ablation, relative to the base recipe's run."""
    table: dict[str, dict[str, Any]] = {
        "whole": {"token_generate_length": settings.max_length},  # G >= len(y), so k = 0 and G = len(y)
        "G12": {"token_generate_length": 12},
        "G48": {"token_generate_length": 48},
        "no-ema": {"ema_beta": 0.0},
        "no-replay": {"max_replay_buffer_size": settings.batch_size, "generation_batch_size": settings.batch_size},
        "ref-policy": {"ref_update_mode": "policy"},
        "ref-fixed": {"ref_update_mode": "fixed"},
        "T1": {"temperature": 1.0},
    }
    if name not in table:
        raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(table)}")
    return table[name]


ABLATION_TEXT = {
    "whole": "whole-response rewrite (k = 0, G = len(y))",
    "G12": "segment G = 12 tokens",
    "G48": "segment G = 48 tokens",
    "no-ema": "current policy as generator (ema_beta = 0)",
    "no-replay": "no replay: buffer = one batch of fresh pairs, generated every step",
    "ref-policy": "reference refreshed from the policy",
    "ref-fixed": "fixed reference (the SFT checkpoint)",
    "T1": "EMA samples at temperature 1.0 (default 0.7)",
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the post-SFT stage."""

    group: str  # grid | main | ablation
    name: str  # recipe, or ablation name
    recipe: str
    seed: int
    learning_rate: float
    beta: float
    split: str  # the split its curve and final score are judged on
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def directory(self) -> str:
        return f"runs/{self.group}/{self.name}/seed-{self.seed}"


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def judged(model: torch.nn.Module, tokenizer: Any, records: Sequence[dict], settings: Settings) -> dict[str, Any]:
    """Greedy generation judged per prompt: overall and per-family mean, mean length, per-prompt scores."""
    from sapo import tasks
    from sapo.judging import evaluate

    was_training = model.training
    result = evaluate(model, tokenizer, records, tasks.judge, max_new_tokens=settings.max_new_tokens,
                      batch_size=settings.eval_batch_size)
    model.train(was_training)
    families = tasks.score_responses(records, result["responses"])
    return {"overall": families.pop("overall"), "by_family": families, "mean_length": result["mean_length"],
            "scores": result["scores"], "responses": result["responses"]}


def _point(step: int, seconds: float, result: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "seconds": round(seconds, 2), "overall": result["overall"], **result["by_family"],
            "mean_length": result["mean_length"]}


def _curve_callback(records: Sequence[dict], settings: Settings, every: int, model_of: Callable[[], Any],
                    tokenizer_of: Callable[[], Any]):
    """A TrainerCallback judging the model every `every` steps and after the last; its clock excludes judging."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.last: dict[str, Any] | None = None
            self.judging = 0.0
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def training_seconds(self) -> float:
            return time.perf_counter() - self.started - self.judging

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % every == 0 or step == state.max_steps:
                seconds, clock = self.training_seconds(), time.perf_counter()
                self.last = judged(model_of(), tokenizer_of(), records, settings)
                self.points.append(_point(step, seconds, self.last))
                self.judging += time.perf_counter() - clock

    return Curve()


# ------------------------------------------------------------------------------------------------
# The SFT start
# ------------------------------------------------------------------------------------------------


def suite_of(settings: Settings) -> dict[str, list[dict]]:
    from sapo import tasks

    return tasks.make_suite(settings.n_train, settings.n_heldout, n_dev=settings.n_dev, seed=SUITE_SEED,
                            families=settings.families)


SFT_KEYS = ("families", "n_train", "n_dev", "hidden_size", "num_layers", "sft_steps", "sft_batch_size",
            "sft_learning_rate", "sft_eval_every", "max_length", "max_prompt_length", "max_new_tokens")


def _key(settings: Settings, names: Sequence[str]) -> dict[str, Any]:
    return json.loads(json.dumps({name: getattr(settings, name) for name in names}))


def train_start(settings: Settings, suite: dict[str, list[dict]], directory: Path, log=print) -> dict[str, Any]:
    """The shared SFT checkpoint with its dev curve; reused from `directory` when trained with the same settings."""
    from transformers import PrinterCallback

    from sapo import tiny
    from sapo.config import SAPOConfig
    from sapo.trainer import SAPOTrainer

    meta_file = directory / "sft.json"
    key = _key(settings, SFT_KEYS)
    if meta_file.exists() and (directory / "model.safetensors").exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            log(f"SFT checkpoint: reusing {directory} (same settings)")
            return meta
    log(f"SFT checkpoint: {settings.sft_steps} steps on {len(suite['train'])} demonstrations, dev curve every "
        f"{settings.sft_eval_every} steps")
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                             max_position_embeddings=max(512, settings.max_length), seed=SUITE_SEED)
    args = SAPOConfig(
        output_dir=str(directory), overwrite_output_dir=True, recipe="sft", seed=SUITE_SEED,
        max_steps=settings.sft_steps, per_device_train_batch_size=settings.sft_batch_size,
        learning_rate=settings.sft_learning_rate, warmup_steps=min(50, settings.sft_steps),
        lr_scheduler_type="cosine", weight_decay=0.0, max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length, logging_steps=50, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True)
    curve = _curve_callback(suite["dev"], settings, settings.sft_eval_every, lambda: model, lambda: tokenizer)
    trainer = SAPOTrainer(model=model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                          callbacks=[curve])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.save_model()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    meta = {"key": key, "dir": str(directory), "dev_curve": curve.points, "loss_first": losses[0],
            "loss_last": losses[-1], "seconds": curve.training_seconds(),
            "parameters": sum(p.numel() for p in model.parameters())}
    meta_file.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


# ------------------------------------------------------------------------------------------------
# One post-SFT run (executed in a worker process)
# ------------------------------------------------------------------------------------------------


RUN_KEYS = ("steps", "batch_size", "warmup_steps", "lr_scheduler", "token_generate_length", "ref_update_steps",
            "spin_iterations", "eval_every", "diagnostic_per_family", "n_heldout")


def run_key(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    return json.loads(json.dumps({"spec": dataclasses.asdict(spec), "sft": _key(settings, SFT_KEYS),
                                  "run": _key(settings, RUN_KEYS)}))


def config_of(spec: RunSpec, settings: Settings, out: Path) -> Any:
    from sapo.config import SAPOConfig

    values: dict[str, Any] = dict(
        output_dir=str(out), overwrite_output_dir=True, recipe=spec.recipe, seed=spec.seed,
        max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=spec.learning_rate, lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps, beta=spec.beta, token_generate_length=settings.token_generate_length,
        ref_update_steps=settings.ref_update_steps, spin_iterations=settings.spin_iterations,
        max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
        logging_steps=settings.eval_every, eval_strategy="steps", eval_steps=settings.eval_every,
        per_device_eval_batch_size=32, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    values.update(dict(spec.overrides))
    return SAPOConfig(**values)


def execute(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """Train one run from the SFT checkpoint; its judged curve, final scores, training metrics and diagnostics."""
    from transformers import PrinterCallback

    from sapo.trainer import SAPOTrainer

    _quiet()
    torch.set_num_threads(1)
    root = Path(settings.out)
    out = root / spec.directory
    suite = suite_of(settings)
    records = suite[spec.split]
    holder: dict[str, Any] = {}
    curve = _curve_callback(records, settings, settings.eval_every, lambda: holder["trainer"].policy,
                            lambda: holder["trainer"].processing_class)
    trainer = SAPOTrainer(model=str(root / "sft"), args=config_of(spec, settings, out),
                          train_dataset=suite["train"], eval_dataset=diagnostic_sets(settings, suite),
                          callbacks=[curve])
    trainer.remove_callback(PrinterCallback)
    holder["trainer"] = trainer
    trainer.train()
    final = curve.last
    result = {"key": run_key(spec, settings), **dataclasses.asdict(spec), "curve": curve.points,
              "final": curve.points[-1], "scores": final["scores"], "responses": final["responses"],
              "seconds": curve.training_seconds(), "judging_seconds": curve.judging,
              "log_history": trainer.state.log_history,
              "buffer": buffer_diagnostics(trainer, suite["train"]) if spec.recipe in SAPO_RECIPES else None}
    (out / "result.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


def diagnostic_sets(settings: Settings, suite: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Dev records per family whose fixed pairs the trainer evaluates during every run (`eval_dataset` by name)."""
    return {family: [r for r in suite["dev"] if r["task"] == family][:settings.diagnostic_per_family]
            for family in settings.families}


def start_diagnostics(settings: Settings, suite: dict[str, list[dict]]) -> dict[str, float]:
    """Per family, the start's per-token log-likelihood of the diagnostic dev answers, by the trainer's own
    evaluation (nothing trained), so that each run's change is measured from the start."""
    from sapo.trainer import SAPOTrainer

    root = Path(settings.out)
    spec = RunSpec("start", "start", "sft", SUITE_SEED, settings.grid_learning_rates[0], 0.1, "dev")
    trainer = SAPOTrainer(model=str(root / "sft"), args=config_of(spec, settings, root / spec.directory),
                          train_dataset=suite["train"][:settings.batch_size],
                          eval_dataset=diagnostic_sets(settings, suite))
    metrics = trainer.evaluate()
    return {family: metrics[f"eval_{family}_logps/real_per_token"] for family in settings.families}


def buffer_diagnostics(trainer: Any, train_records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per family, over the final replay buffer: rejected == real, where segments start (fraction of the
    response), and how often the judge scores the rejected answer below the real one."""
    from sapo import tasks

    tokenizer = trainer.processing_class
    by_reference = {record["reference"]: record for record in train_records}
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for entry in trainer.recipe.buffer.entries():
        real = tokenizer.decode(entry.real, skip_special_tokens=True)
        record = by_reference.get(real)
        if record is None:
            continue
        rejected = tokenizer.decode(entry.rejected, skip_special_tokens=True)
        prompt = tasks.prompt_of(record)
        worse = tasks.judge(prompt, rejected, record) < tasks.judge(prompt, real, record)
        rows.setdefault(record["task"], []).append(
            (float(entry.rejected == entry.real), entry.segment_start / max(1, len(entry.real)), float(worse)))
    return {family: {"entries": len(values),
                     "identical": statistics.fmean(v[0] for v in values),
                     "segment_start": statistics.fmean(v[1] for v in values),
                     "judged_worse": statistics.fmean(v[2] for v in values)}
            for family, values in rows.items()}


def cached_result(spec: RunSpec, settings: Settings) -> dict[str, Any] | None:
    """The run's saved result when it was trained with the same settings, else None."""
    path = Path(settings.out) / spec.directory / "result.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == run_key(spec, settings):
            return saved
    return None


def cached_or_run(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    return cached_result(spec, settings) or execute(spec, settings)


def run_all(specs: Sequence[RunSpec], settings: Settings, log=print) -> list[dict[str, Any]]:
    """Every spec, `settings.workers` at a time, each in a subprocess of this script (one torch thread each;
    a run's memory is returned to the system when it ends). Results come back in the order of `specs`."""
    if settings.workers <= 1:
        results = []
        for spec in specs:
            results.append(cached_or_run(spec, settings))
            _log_run(results[-1], log)
        return results
    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        futures = [pool.submit(_run_in_subprocess, spec, settings) for spec in specs]
        results = []
        for future in futures:
            results.append(future.result())
            _log_run(results[-1], log)
    return results


def _run_in_subprocess(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """A cached run is read here; only a run to train pays for a fresh interpreter importing torch."""
    saved = cached_result(spec, settings)
    if saved is not None:
        return saved
    job = Path(settings.out) / spec.directory / "job.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"spec": dataclasses.asdict(spec), "settings": dataclasses.asdict(settings)}))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {spec.directory} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads((job.parent / "result.json").read_text())


def worker_main(job_file: str) -> int:
    """`quality.py --worker JOB`: one run described by a job file that `_run_in_subprocess` wrote."""
    job = json.loads(Path(job_file).read_text())
    spec = job["spec"]
    spec["overrides"] = tuple(tuple(pair) for pair in spec["overrides"])
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in job["settings"].items()}
    cached_or_run(RunSpec(**spec), Settings(**settings))
    return 0


def _log_run(result: dict[str, Any], log) -> None:
    final = result["final"]
    log(f"  {result['group']:<8} {result['name']:<10} seed {result['seed']} lr {result['learning_rate']:g} "
        f"beta {result['beta']:g}: {result['split']} score {final['overall']:.3f} ({result['seconds']:.0f} s "
        f"training, {result['judging_seconds']:.0f} s judging)")


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


def grid_specs(settings: Settings) -> list[RunSpec]:
    seed = settings.seeds[0]
    specs = []
    for recipe in settings.recipes:
        betas = settings.grid_betas[:1] if recipe == "sft" else settings.grid_betas
        specs += [RunSpec("grid", f"{recipe}_lr{lr:g}_b{beta:g}", recipe, seed, lr, beta, "dev")
                  for lr in settings.grid_learning_rates for beta in betas]
    return specs


def choose(grid: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per recipe, the (learning rate, beta) with the best final dev score (the first listed on a tie)."""
    best: dict[str, dict[str, Any]] = {}
    for run in grid:
        if run["recipe"] not in best or run["final"]["overall"] > best[run["recipe"]]["final"]["overall"]:
            best[run["recipe"]] = run
    return {recipe: (run["learning_rate"], run["beta"]) for recipe, run in best.items()}


def tune(settings: Settings, log=print) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float]]]:
    """The grid's dev runs and each recipe's chosen (learning rate, beta); a one-point grid needs no runs."""
    if len(settings.grid_learning_rates) == 1 and len(settings.grid_betas) == 1:
        point = (settings.grid_learning_rates[0], settings.grid_betas[0])
        log(f"one-point grid: lr {point[0]:g}, beta {point[1]:g} for every recipe, not tuned")
        return [], dict.fromkeys(settings.recipes, point)
    log(f"grid on dev: {len(grid_specs(settings))} runs")
    grid = run_all(grid_specs(settings), settings, log)
    return grid, choose(grid)


def main_specs(settings: Settings, chosen: dict[str, tuple[float, float]]) -> list[RunSpec]:
    return [RunSpec("main", recipe, recipe, seed, *chosen[recipe], "heldout")
            for seed in settings.seeds for recipe in settings.recipes]


def ablation_specs(settings: Settings, chosen: dict[str, tuple[float, float]]) -> list[RunSpec]:
    if BASE not in chosen:
        return []
    return [RunSpec("ablation", name, BASE, seed, *chosen[BASE], "heldout",
                    tuple(sorted(ablation_settings(name, settings).items())))
            for seed in settings.seeds for name in settings.ablations]


def run_benchmark(settings: Settings, log=print) -> dict[str, Any]:
    """SFT start, grid on dev, recipes and ablations on held-out; writes results.json, table.md, curves.png."""
    unknown = [r for r in settings.recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    for name in settings.ablations:
        ablation_settings(name, settings)
    if not settings.seeds or settings.steps < 1 or settings.eval_every < 1:
        raise ValueError("need at least one seed, steps >= 1 and eval_every >= 1")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    _quiet()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        suite = suite_of(settings)
        sft = train_start(settings, suite, out / "sft", log)
        log("  dev curve: " + ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["dev_curve"]))
        start = _start_scores(settings, suite, out / "sft")
        log(f"  held-out score of the start {start['overall']:.3f}")
        grid, chosen = tune(settings, log)
        specs = main_specs(settings, chosen) + ablation_specs(settings, chosen)
        log(f"recipes and ablations on held-out: {len(specs)} runs")
        runs = run_all(specs, settings, log)
    finally:
        torch.set_num_threads(threads)
    result = summarise(settings, sft, start, grid, chosen, runs, start_diagnostics(settings, suite))
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = markdown_table(result)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot_curves(result, out / "curves.png")
    plot_diagnostics(result, out / "diagnostics.png")
    result["table"] = table
    return result


def _start_scores(settings: Settings, suite: dict[str, list[dict]], directory: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory)
    return judged(model, AutoTokenizer.from_pretrained(directory), suite["heldout"], settings)


# ------------------------------------------------------------------------------------------------
# Summary, table, plot
# ------------------------------------------------------------------------------------------------


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


def _last_logged(history: Sequence[dict[str, Any]], name: str) -> float | None:
    values = [row[name] for row in history if name in row]
    return values[-1] if values else None


def summarise(settings: Settings, sft: dict, start: dict, grid: Sequence[dict], chosen: dict,
              runs: Sequence[dict], start_logps: dict[str, float]) -> dict[str, Any]:
    from sapo.judging import win_rates

    families = list(settings.families)
    start_point = _point(0, 0.0, start)
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
        summary[label] = {
            "group": row["group"], "name": row["name"],
            **{key: _stats([r["final"][key] for r in group]) for key in ("overall", *families, "mean_length")},
            "at_equal_time": _stats([score_at_time(r["curve"], budgets[r["seed"]]) for r in group]),
            "win_vs_start": _stats([r["win_vs_start"] for r in group]),
            "seconds": _stats([r["seconds"] for r in group]),
            "diagnostics": _diagnostics(group, families, start_logps),
        }
    return {"settings": dataclasses.asdict(settings), "families": families, "sft": sft,
            "start": {**start_point, "scores": start["scores"], "responses": start["responses"]},
            "grid": [{k: g[k] for k in ("recipe", "learning_rate", "beta", "final", "seconds")} for g in grid],
            "chosen": chosen, "budgets": budgets, "summary": summary, "start_logps": start_logps,
            "runs": [{k: v for k, v in r.items() if k != "responses"} for r in runs]}


def _diagnostics(group: Sequence[dict], families: Sequence[str], start_logps: dict[str, float]) -> dict[str, Any]:
    """Per family: final dev-pair margin, accuracy and real per-token log-likelihood (and its change from the
    start), and the replay buffer's statistics; means over the group's seeds."""
    result: dict[str, Any] = {}
    for family in families:
        prefix = f"eval_{family}_"
        values: dict[str, list[float]] = {}
        for run in group:
            for name in ("rewards/margins", "rewards/accuracies", "logps/real_per_token"):
                value = _last_logged(run["log_history"], prefix + name)
                if value is not None:
                    values.setdefault(name, []).append(value)
            for name, value in ((run.get("buffer") or {}).get(family) or {}).items():
                if name != "entries":
                    values.setdefault(f"buffer/{name}", []).append(value)
        means = {name: _stats(v)["mean"] for name, v in values.items()}
        if "logps/real_per_token" in means:
            means["real_per_token_change"] = means["logps/real_per_token"] - start_logps[family]
        result[family] = means
    return result


def diagnostic_curve(runs: Sequence[dict], family: str, name: str, start: float | None = None) -> tuple[list, list]:
    """(steps, mean over runs) of one evaluated dev-pair metric; `start` is put at step 0 when given."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run["log_history"]:
            if f"eval_{family}_{name}" in row:
                by_step.setdefault(row["step"], []).append(row[f"eval_{family}_{name}"])
    steps = sorted(by_step)
    values = [statistics.fmean(by_step[step]) for step in steps]
    return ([0, *steps], [start, *values]) if start is not None else (steps, values)


def _cell(stats: dict[str, Any], digits: int = 3) -> str:
    if not stats["values"]:
        return "—"
    if len(stats["values"]) == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    s, families, summary, sft = result["settings"], result["families"], result["summary"], result["sft"]
    curve = ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["dev_curve"])
    chosen = ", ".join(f"{r} lr {lr:g}" + ("" if r == "sft" else f" beta {b:g}")
                       for r, (lr, b) in result["chosen"].items())
    lines = [
        f"Start: one SFT checkpoint ({sft['parameters']:,} parameters, {s['sft_steps']} steps, batch "
        f"{s['sft_batch_size']}, cosine from {s['sft_learning_rate']:g}); dev score by step: {curve}.",
        "",
        f"Held-out judge score ({s['n_heldout']} prompts, greedy, partial credit) after {s['steps']} optimizer "
        f"steps of batch {s['batch_size']} from that checkpoint ({s['warmup_steps']} warm-up steps, then "
        f"{s['lr_scheduler']} schedule); mean ± std over seeds "
        f"{', '.join(map(str, s['seeds']))}. {_tuning_text(result, chosen)}. SAPO: segment G = "
        f"{s['token_generate_length']} tokens, reference refreshed every {s['ref_update_steps']} steps. "
        "Equal time = the score interpolated at the training time of the fastest recipe of the same seed.",
        "",
        "| run | overall (equal steps) | " + " | ".join(families)
        + " | equal time | win rate vs start | length | train s/run |",
        "|---|" + "---|" * (len(families) + 5),
        f"| {START} | {result['start']['overall']:.3f} | "
        + " | ".join(f"{result['start'][f]:.3f}" for f in families)
        + f" | — | — | {result['start']['mean_length']:.1f} | — |",
    ]
    for label, row in summary.items():
        name = label if row["group"] == "main" else f"{label}: {ABLATION_TEXT.get(row['name'], '')}"
        lines.append(f"| {name} | {_cell(row['overall'])} | " + " | ".join(_cell(row[f]) for f in families)
                     + f" | {_cell(row['at_equal_time'])} | {_cell(row['win_vs_start'])} | "
                     f"{_cell(row['mean_length'], 1)} | {row['seconds']['mean']:.0f} |")
    lines += ["", "Diagnostics (mean over seeds; first over the families, then per family): the fixed dev pairs' "
              "final reward margin and accuracy, the change of the real answers' per-token log-likelihood from "
              "the start; from the final replay buffer: rejected == real, segment start (fraction of the "
              "response), rejected judged worse than the real answer.", ""]
    lines += _diagnostics_table(summary, ["all"], {label: {"all": _over_families(row["diagnostics"], families)}
                                                   for label, row in summary.items()})
    lines += [""] + _diagnostics_table(summary, families, {label: row["diagnostics"]
                                                            for label, row in summary.items()})
    return "\n".join(lines) + "\n"


DIAGNOSTICS = ("rewards/margins", "rewards/accuracies", "real_per_token_change", "buffer/identical",
               "buffer/segment_start", "buffer/judged_worse")


def _over_families(diagnostics: dict[str, dict[str, float]], families: Sequence[str]) -> dict[str, float]:
    return {name: statistics.fmean(diagnostics[f][name] for f in families)
            for name in DIAGNOSTICS if all(name in diagnostics.get(f, {}) for f in families)}


def _diagnostics_table(summary: dict[str, Any], families: Sequence[str],
                       diagnostics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| run | family | margin | accuracy | Δ real logp/token | identical | segment start | judged worse |",
             "|---|---|---|---|---|---|---|---|"]
    for label in summary:
        for family in families:
            cells = [diagnostics[label].get(family, {}).get(name) for name in DIAGNOSTICS]
            lines.append(f"| {label} | {family} | "
                         + " | ".join("—" if c is None or not math.isfinite(c) else f"{c:.3f}" for c in cells) + " |")
    return lines


def _tuning_text(result: dict[str, Any], chosen: str) -> str:
    s = result["settings"]
    if not result["grid"]:
        return (f"One setting for every recipe, not tuned: lr {s['grid_learning_rates'][0]:g}, beta "
                f"{s['grid_betas'][0]:g}")
    return (f"Learning rate and beta chosen per recipe on the dev split from lr "
            f"{{{', '.join(f'{v:g}' for v in s['grid_learning_rates'])}}} x beta "
            f"{{{', '.join(f'{v:g}' for v in s['grid_betas'])}}}: {chosen}")


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Held-out score vs step (mean over seeds, band ± std), overall and per family; the SFT dev curve first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = ["overall", *result["families"]]
    figure = Figure(figsize=(4.0 * (len(keys) + 1), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(keys) + 1, squeeze=False)[0]
    sft_curve = result["sft"]["dev_curve"]
    for key in keys:
        axes[0].plot([p["step"] for p in sft_curve], [p[key] for p in sft_curve], marker="o", markersize=3,
                     label=key)
    axes[0].set_title("SFT start: dev score", fontsize="medium")
    axes[0].set_xlabel("SFT step")
    axes[0].legend(fontsize="small")
    by_label: dict[str, list[dict]] = {}
    for run in result["runs"]:
        if run["group"] == "main":
            by_label.setdefault(run["name"], []).append(run)
    for ax, key in zip(axes[1:], keys, strict=True):
        for index, (label, runs) in enumerate(by_label.items()):
            steps = [p["step"] for p in runs[0]["curve"]]
            per_step = [[run["curve"][i][key] for run in runs] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in per_step]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
            color = f"C{index % 10}"
            ax.plot(steps, mean, label=label, color=color, marker="o", markersize=3, linewidth=1.5)
            ax.fill_between(steps, [m - d for m, d in zip(mean, std, strict=True)],
                            [m + d for m, d in zip(mean, std, strict=True)], color=color, alpha=0.12, linewidth=0)
        ax.set_title(f"held-out: {key}", fontsize="medium")
        ax.set_xlabel("optimizer step after SFT")
        ax.grid(True, alpha=0.3)
    axes[1].set_ylabel("judge score (mean over seeds)")
    axes[1].legend(fontsize="small")
    figure.savefig(path, format="png")
    return path


def plot_diagnostics(result: dict[str, Any], path: Path) -> Path:
    """Per family, over training (mean over seeds): the fixed dev pairs' reward margin and the real answers'
    per-token log-likelihood, for every recipe and ablation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    families = result["families"]
    figure = Figure(figsize=(4.0 * len(families), 7.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(families), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault(run["name"] if run["group"] == "main" else f"ablation: {run['name']}", []).append(run)
    for column, family in enumerate(families):
        for index, (label, runs) in enumerate(groups.items()):
            style = {"color": f"C{index % 10}", "marker": "o", "markersize": 3, "label": label,
                     "linestyle": "-" if runs[0]["group"] == "main" else ":"}
            steps, margins = diagnostic_curve(runs, family, "rewards/margins")
            if steps:
                axes[0][column].plot(steps, margins, **style)
            axes[1][column].plot(*diagnostic_curve(runs, family, "logps/real_per_token",
                                                   result["start_logps"][family]), **style)
        axes[0][column].set_title(f"{family}: dev-pair reward margin", fontsize="medium")
        axes[1][column].set_title(f"{family}: real answers' log-likelihood / token", fontsize="medium")
        for row in (0, 1):
            axes[row][column].set_xlabel("optimizer step after SFT")
            axes[row][column].grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="x-small")
    figure.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
        if isinstance(value, tuple):
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
        values["out"] = "runs/quality-quick"
    for name in values:
        given = getattr(args, name)
        if given is not None:
            values[name] = tuple(given) if isinstance(values[name], tuple) else given
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    settings = settings_from_args(argv)
    result = run_benchmark(settings)
    print("\n" + result["table"])
    print(f"wrote {Path(settings.out) / 'table.md'}, results.json and curves.png; "
          f"wall time {result['seconds']:.0f} s ({result['seconds'] / 60:.1f} min)")
    finals = [r["final"]["overall"] for r in result["runs"]]
    return 0 if all(math.isfinite(v) for v in finals) else 1


if __name__ == "__main__":
    raise SystemExit(main())

