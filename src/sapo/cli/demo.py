"""`sapo demo`: the whole pipeline offline on 2 CPU cores in a few minutes.

Builds a character-level tokenizer and a small Llama-shaped model, trains it with a short SFT warm-up
on the built-in task suite (arithmetic, string transformations, instruction constraints), saves that
SFT checkpoint, then runs SAPO-DPO from the saved directory exactly as a user would with their own
checkpoint, and reports the programmatic judge's held-out score before and after: per task family, with the
paired per-prompt change, its standard error and whether it is within noise (`sapo.demo_kit.report`). Each stage
shows its progress with an ETA (`sapo.demo_kit.progress`), and the demo ends with the `sapo plot`, `sapo inspect`
and `sapo eval` commands that work on its outputs as printed (the SAPO stage keeps one checkpoint, at its last
step, for the replay buffer `sapo inspect` reads). Every `DemoSettings` field is a flag (`sapo demo --help`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.utils.logging import disable_progress_bar

from sapo.callbacks import LogLines
from sapo.config import SAPOConfig
from sapo.demo_kit import report, task_judges, tasks, tiny
from sapo.demo_kit.progress import StageProgress, TrainerProgress
from sapo.judging import evaluate
from sapo.trainer import SAPOTrainer

logger = logging.getLogger(__name__)

EVAL_MAX_NEW_TOKENS = 40  # the demo's answers are a few characters; `sapo eval` is told the same limit
EVAL_BATCH_SIZE = 64  # `sapo eval`'s default batch, so its greedy answers match the demo's


@dataclass
class DemoSettings:
    """Defaults sized for about 3 minutes on 2 shared CPU cores (SFT ~75% of it, SAPO ~20%, evaluation ~3%).

    SAPO stage: at learning rates >= 2e-4 (and with beta 0.1 even at 1e-4) this tiny model's greedy held-out
    score drops, as it also does for plain continued SFT at those rates; a high beta keeps the policy close to
    the SFT reference so 1e-4 moves it without hurting. Expect a before/after change of about +-0.01 (the
    size of the noise), not a clear gain. ``num_threads=1`` because two torch threads on two cores that other
    processes also use slow training down several-fold.
    """

    output_dir: str = "runs/demo"
    seed: int = 0
    n_train: int = 3000
    n_heldout: int = 600
    hidden_size: int = 128
    num_layers: int = 4
    sft_steps: int = 600
    sft_batch_size: int = 32
    sft_learning_rate: float = 2e-3
    sapo_steps: int = 100
    sapo_batch_size: int = 16
    sapo_learning_rate: float = 1e-4
    sapo_warmup_steps: int = 10
    sapo_lr_scheduler: str = "linear"
    loss_type: str = "sigmoid"
    beta: float = 5.0
    token_generate_length: int = 6
    eval_ema: bool = False
    num_threads: int = 1


FLAG_HELP = {
    "output_dir": "where the SFT checkpoint (sft/), the SAPO run (sapo/), the data and demo_results.json go",
    "seed": "seed of the suite, the models and training", "n_train": "training demonstrations of the task suite",
    "n_heldout": "held-out prompts judged before and after", "hidden_size": "width of the tiny Llama",
    "num_layers": "layers of the tiny Llama", "sft_steps": "optimizer steps of the SFT warm-up",
    "sft_batch_size": "SFT batch size", "sft_learning_rate": "SFT peak learning rate",
    "sapo_steps": "optimizer steps of SAPO", "sapo_batch_size": "SAPO batch size",
    "sapo_learning_rate": "SAPO peak learning rate", "sapo_warmup_steps": "SAPO warm-up steps",
    "sapo_lr_scheduler": "SAPO learning-rate schedule", "loss_type": "SAPO's loss (sigmoid: SAPO-DPO)",
    "beta": "the loss's beta", "token_generate_length": "tokens the EMA model rewrites per response (segment G)",
    "eval_ema": "also judge the EMA model after SAPO", "num_threads": "torch threads (1: faster on shared cores)",
}
"""`sapo demo --help`: what each DemoSettings field sets."""


def sft_warmup(model: torch.nn.Module, tokenizer, records: Sequence[dict], directory: Path, *, steps: int,
               batch_size: int, learning_rate: float, seed: int,
               callbacks: Sequence[TrainerCallback] = ()) -> list[float]:
    """Supervised fine-tuning of the real responses with the `sft` recipe (50 warm-up steps, then linear decay),
    saved to `directory`: SAPO's starting SFT checkpoint. Returns the per-step losses."""
    args = SAPOConfig(
        output_dir=str(directory), recipe="sft", max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, warmup_steps=min(50, steps), lr_scheduler_type="linear", weight_decay=0.0,
        max_length=128, max_prompt_length=96, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=seed, disable_tqdm=True, overwrite_output_dir=True)
    trainer = SAPOTrainer(model=model, args=args, train_dataset=list(records), processing_class=tokenizer,
                          callbacks=list(callbacks))
    trainer.remove_callback(LogLines)  # the demo prints its own summary, not a log row per step
    trainer.train()
    trainer.save_model()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def train_sft_checkpoint(records: Sequence[dict], directory: Path, *, hidden_size: int, num_layers: int,
                         steps: int, batch_size: int, learning_rate: float, seed: int,
                         callbacks: Sequence[TrainerCallback] = ()):
    """Build the tiny tokenizer and model, SFT-warm them on `records` and save both to `directory`.

    Shared by the demo and `benchmarks/quality.py`, so both start SAPO from the same kind of checkpoint.
    Returns (model, tokenizer, per-step SFT losses).
    """
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    losses = sft_warmup(model, tokenizer, records, directory, steps=steps, batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed, callbacks=callbacks)
    return model, tokenizer, losses


def held_out_score(model, tokenizer, records: Sequence[dict], *, label: str | None = None) -> dict:
    """Greedy answers to `records` judged per prompt: mean score, per-family means and every prompt's score (the
    before/after report pairs them). With `label`, progress lines with an ETA, one batch of 64 prompts at a time
    (batches as `sapo eval` makes them, so it reproduces these scores)."""
    progress = StageProgress(label, len(records), "prompts") if label else None
    scores: list[float] = []
    responses: list[str] = []
    for start in range(0, len(records), EVAL_BATCH_SIZE):
        result = evaluate(model, tokenizer, records[start:start + EVAL_BATCH_SIZE], task_judges.judge,
                          max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=EVAL_BATCH_SIZE)
        scores += result["scores"]
        responses += result["responses"]
        if progress:
            progress.update(len(scores))
    if progress:
        progress.close()
    families = task_judges.score_responses(records, responses)
    return {"score": sum(scores) / max(1, len(scores)), "by_family": families,
            "mean_length": sum(len(r) for r in responses) / max(1, len(responses)), "scores": scores}


def _sapo_config(settings: DemoSettings, sapo_dir: Path) -> SAPOConfig:
    """The SAPO stage's settings. One checkpoint at the last step (save_steps = max_steps) keeps the replay buffer
    in `checkpoint-N/sapo_state`, which `sapo inspect` reads, as any run with checkpoints does."""
    return SAPOConfig(
        output_dir=str(sapo_dir), max_steps=settings.sapo_steps, per_device_train_batch_size=settings.sapo_batch_size,
        learning_rate=settings.sapo_learning_rate, lr_scheduler_type=settings.sapo_lr_scheduler,
        warmup_steps=settings.sapo_warmup_steps, loss_type=settings.loss_type,
        beta=settings.beta, token_generate_length=settings.token_generate_length, max_length=128,
        max_prompt_length=96, logging_steps=max(1, min(10, settings.sapo_steps // 10)), save_strategy="steps",
        save_steps=settings.sapo_steps, save_total_limit=1, report_to="none", use_cpu=True, seed=settings.seed,
        disable_tqdm=True, overwrite_output_dir=True,
    )


def run(settings: DemoSettings) -> dict:
    out = Path(settings.output_dir)
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    torch.manual_seed(settings.seed)
    suite = tasks.make_suite(settings.n_train, settings.n_heldout, seed=settings.seed)
    started = time.perf_counter()
    timing: dict[str, float] = {}
    disable_progress_bar()  # transformers' load and save bars would interleave with the demo's own lines
    clock = time.perf_counter()
    print(f"[1/3] SFT warm-up: {settings.sft_steps} steps on {len(suite['train'])} demonstrations", flush=True)
    sft_dir = out / "sft"
    model, tokenizer, losses = train_sft_checkpoint(
        suite["train"], sft_dir, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
        steps=settings.sft_steps, batch_size=settings.sft_batch_size, learning_rate=settings.sft_learning_rate,
        seed=settings.seed, callbacks=[TrainerProgress("SFT", settings.sft_steps)])
    write_jsonl(out / "train.jsonl", suite["train"])  # so `sapo train --config examples/demo.yaml` can reuse them
    heldout_file = out / "heldout.jsonl"
    write_jsonl(heldout_file, suite["heldout"])  # what the printed `sapo eval` command scores
    timing["sft"], clock = time.perf_counter() - clock, time.perf_counter()
    before = held_out_score(model, tokenizer, suite["heldout"], label="judging SFT")
    timing["eval_sft"], clock = time.perf_counter() - clock, time.perf_counter()
    print(f"      SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out judge score {before['score']:.3f}", flush=True)

    print(f"[2/3] SAPO ({settings.loss_type}): {settings.sapo_steps} steps from {sft_dir}", flush=True)
    sapo_dir = out / "sapo"
    trainer = SAPOTrainer(model=str(sft_dir), args=_sapo_config(settings, sapo_dir), train_dataset=suite["train"],
                          callbacks=[TrainerProgress("SAPO", settings.sapo_steps)])
    trainer.remove_callback(LogLines)
    trainer.sampler = _TimedSampler(trainer.sampler)
    trainer.train()
    trainer.save_model()
    timing["sapo"], clock = time.perf_counter() - clock, time.perf_counter()
    timing["sapo_generation"] = trainer.sampler.seconds
    print("[3/3] evaluating on held-out prompts", flush=True)
    after = held_out_score(trainer.policy, trainer.processing_class, suite["heldout"], label="judging SAPO")
    timing["eval_sapo"], clock = time.perf_counter() - clock, time.perf_counter()
    summary = {"before": before, "after": after, "sft_dir": str(sft_dir), "sapo_dir": str(sapo_dir),
               "heldout": str(heldout_file), "tasks": [record["task"] for record in suite["heldout"]]}
    if settings.eval_ema:
        with trainer.copies.as_model("ema") as ema_model:
            summary["ema_after"] = held_out_score(ema_model, trainer.processing_class, suite["heldout"],
                                                  label="judging EMA")
        timing["eval_ema"] = time.perf_counter() - clock
    summary["change"] = report.family_changes(suite["heldout"], before["scores"], after["scores"])
    summary.update(timing=timing, seconds=time.perf_counter() - started)
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


class _TimedSampler:
    """Wraps the trainer's segment sampler to report how much of the SAPO stage is generation."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.seconds = 0.0

    def sample(self, model, contexts, max_new_tokens):
        started = time.perf_counter()
        try:
            return self.sampler.sample(model, contexts, max_new_tokens)
        finally:
            self.seconds += time.perf_counter() - started


def print_summary(summary: dict) -> None:
    """The before/after table with the paired change and its verdict, where the outputs are, and what to run next."""
    records = [{"task": task} for task in summary["tasks"]]
    columns = {"SFT (before)": summary["before"]["scores"], "SAPO (after)": summary["after"]["scores"]}
    if "ema_after" in summary:
        columns["SAPO EMA"] = summary["ema_after"]["scores"]
    print(f"\nheld-out prompts, greedy; change = mean per-prompt (SAPO - SFT) score, ± its standard error\n"
          f"{report.score_table(records, columns)}\n")
    overall = report.paired_difference(summary["before"]["scores"], summary["after"]["scores"])
    print(report.conclusion(overall, "SAPO policy", "SFT"))
    if "ema_after" in summary:
        ema = report.paired_difference(summary["before"]["scores"], summary["ema_after"]["scores"])
        print(report.conclusion(ema, "SAPO EMA model", "SFT"))
    timing = summary.get("timing", {})
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timing.items())
    print(f"\nSFT checkpoint: {summary['sft_dir']}\nSAPO policy:    {summary['sapo_dir']}  "
          f"(EMA model in {summary['sapo_dir']}/ema)\nwall time: {summary['seconds']:.0f} s ({phases})\n")
    commands = report.next_commands(sft_dir=Path(summary["sft_dir"]), sapo_dir=Path(summary["sapo_dir"]),
                                    heldout=Path(summary["heldout"]), max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                    program=report.runnable_sapo())
    print(report.format_next(commands), flush=True)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="sapo demo", description=__doc__.splitlines()[0])
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name}", type=_parse_bool if isinstance(value, bool) else type(value), default=value,
                            help=f"{FLAG_HELP[name]} (default: {value})")
    parsed = parser.parse_args(list(argv or []))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    run(DemoSettings(**vars(parsed)))
    return 0
