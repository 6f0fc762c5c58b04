"""One post-SFT run and how runs are executed: its trainer config, training with the curve and diagnostics,
the cache of finished runs, and the worker processes (this benchmark's script re-launched with --worker)."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .diagnostics import (
    buffer_diagnostics,
    logged_diagnostics,
    probe_of,
    rewrite_census,
    tokenized_pairs,
    trained_prompts,
)
from .evaluation import curve_callback, quiet_libraries
from .settings import RECIPE_VARIANTS, SAPO_RECIPES, SUITE_SEED, RunSpec, Settings, run_key
from .suite import diagnostic_records, suite_of


def config_of(spec: RunSpec, settings: Settings, out: Path) -> Any:
    from sapo.config import SAPOConfig

    recipe, variant = RECIPE_VARIANTS.get(spec.recipe, (spec.recipe, {}))
    values: dict[str, Any] = dict(
        output_dir=str(out), overwrite_output_dir=True, recipe=recipe, seed=spec.seed,
        max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=spec.learning_rate, lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps, beta=spec.beta, token_generate_length=settings.token_generate_length,
        temperature=settings.temperature, ref_update_steps=settings.ref_update_steps,
        spin_iterations=settings.spin_iterations, spin_max_new_tokens=settings.max_new_tokens,
        max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length, logging_steps=settings.eval_every, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True)
    values.update(variant)
    values.update(dict(spec.overrides))
    return SAPOConfig(**values)


CONFIG_SHOWN = ("identical_rejected", "skips_no_signal_steps", "rejected_judge", "nll_weight", "temperature",
                "ema_beta", "token_generate_length", "learning_rate", "beta")
"""The settings each run's trainer actually ran with (skips_no_signal_steps: sapo's resolved default)."""


def execute(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """Train one run from the SFT checkpoint on the new demonstrations; its judged curve with fixed-pair
    diagnostics at every point, final scores, training metrics, the prompts it was given, and for SAPO runs the
    census of its generator's rewrites at the end and of its final replay buffer."""
    from transformers import AutoModelForCausalLM

    from sapo.callbacks import LogLines
    from sapo.trainer import SAPOTrainer

    quiet_libraries()
    torch.set_num_threads(1)
    root = Path(settings.out)
    out = root / spec.directory
    suite = suite_of(settings)
    start = json.loads((root / "sft" / "start.json").read_text())
    probe = probe_of(start, AutoModelForCausalLM.from_pretrained(root / "sft"))
    holder: dict[str, Any] = {}
    curve = curve_callback(suite[spec.split], settings, settings.eval_every, lambda: holder["trainer"].policy,
                            lambda: holder["trainer"].processing_class, probe)
    trainer = SAPOTrainer(model=str(root / "sft"), args=config_of(spec, settings, out),
                          train_dataset=suite["train"], callbacks=[curve])
    trainer.remove_callback(LogLines)
    holder["trainer"] = trainer
    trainer.train()
    sapo = spec.recipe in SAPO_RECIPES
    final = curve.last
    result = {"key": run_key(spec, settings), **dataclasses.asdict(spec), "curve": curve.points,
              "final": curve.points[-1], "scores": final["scores"], "responses": final["responses"],
              "seconds": curve.training_seconds(), "judging_seconds": curve.judging, "process": os.getpid(),
              "log_history": trainer.state.log_history, "logged": logged_diagnostics(trainer.state.log_history),
              "config": {name: getattr(trainer.args, name) for name in CONFIG_SHOWN},
              "buffer": buffer_diagnostics(trainer, suite["train"]) if sapo else None,
              "census": rewrite_census(trainer, tokenized_pairs(trainer, diagnostic_records(settings, suite)),
                                       SUITE_SEED)["families"] if sapo else None}
    (out / "trained_prompts.json").write_text(json.dumps(trained_prompts(trainer)) + "\n", encoding="utf-8")
    (out / "result.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


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


ENTRY = Path(__file__).resolve().parents[1] / "quality.py"
"""The script a worker process runs (`quality.py --worker`): the benchmark's entry point, not this module."""
RUNS_PER_WORKER = 8  # a worker process serves this many runs, then a fresh one returns its memory to the system
DONE, FAILED = "@@quality-done", "@@quality-failed"  # a worker's replies on stdout, one line per job


def run_all(specs: Sequence[RunSpec], settings: Settings, log=print) -> list[dict[str, Any]]:
    """Every spec, `settings.workers` at a time, in worker processes of this script (one torch thread each),
    each serving up to RUNS_PER_WORKER runs so that importing torch is paid once per worker, not once per run.
    Cached runs are read here. Results come back in the order of `specs`; each is logged when it ends."""
    if settings.workers <= 1:
        results = []
        for spec in specs:
            results.append(cached_or_run(spec, settings))
            _log_run(results[-1], log)
        return results
    results: list[dict[str, Any] | None] = [cached_result(spec, settings) for spec in specs]
    for result in results:
        if result is not None:
            _log_run(result, log)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index, result in enumerate(results):
        if result is None:
            todo.put(index)

    def serve() -> None:
        with Worker(settings) as worker:
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                results[index] = worker.run(specs[index])
                _log_run(results[index], log)

    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        for future in [pool.submit(serve) for _ in range(settings.workers)]:
            future.result()
    return [result for result in results if result is not None]


class Worker:
    """A `quality.py --worker` process fed job files on stdin, one per line; it answers each with a DONE or
    FAILED line on stdout (anything else the libraries print there is skipped). Replaced every
    RUNS_PER_WORKER runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.stderr: Any = None
        self.served = 0

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process = None
            self.stderr.close()

    def run(self, spec: RunSpec) -> dict[str, Any]:
        if self.process is None or self.served >= RUNS_PER_WORKER:
            self.close()
            self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed with the process, in close()
            self.process = subprocess.Popen([sys.executable, str(ENTRY), "--worker"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                            text=True)
            self.served = 0
        job = Path(self.settings.out) / spec.directory / "job.json"
        job.parent.mkdir(parents=True, exist_ok=True)
        job.write_text(json.dumps({"spec": dataclasses.asdict(spec), "settings": dataclasses.asdict(self.settings)}))
        self.process.stdin.write(f"{job}\n")
        self.process.stdin.flush()
        self.served += 1
        for line in self.process.stdout:
            if line.startswith(DONE):
                return json.loads((job.parent / "result.json").read_text())
            if line.startswith(FAILED):
                raise RuntimeError(f"run {spec.directory} failed:\n{(job.parent / 'error.txt').read_text()[-4000:]}")
        self.stderr.seek(0)
        raise RuntimeError(f"run {spec.directory}: its worker process ended (exit {self.process.wait()}):\n"
                           f"{self.stderr.read()[-4000:]}")


def worker_main(job_files: Sequence[str]) -> int:
    """`quality.py --worker [JOB...]`: the runs described by job files that `Worker` wrote, given as arguments
    or one per line on stdin; each answered on stdout, a failure's traceback left in the run's error.txt."""
    import traceback

    for line in job_files or sys.stdin:
        path = Path(line.strip())
        job = json.loads(path.read_text())
        spec = job["spec"]
        spec["overrides"] = tuple(tuple(pair) for pair in spec["overrides"])
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in job["settings"].items()}
        try:
            cached_or_run(RunSpec(**spec), Settings(**settings))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it with the traceback
            (path.parent / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            print(FAILED, flush=True)
            if job_files:
                return 1
            continue
        print(DONE, flush=True)
    return 0


def _log_run(result: dict[str, Any], log) -> None:
    final = result["final"]
    log(f"  {result['group']:<8} {result['name']:<10} seed {result['seed']} lr {result['learning_rate']:g} "
        f"beta {result['beta']:g}: {result['split']} score {final['overall']:.3f} ({result['seconds']:.0f} s "
        f"training, {result['judging_seconds']:.0f} s judging)")
