"""Metrics: the names a run logs, how values are recorded between logs, their cross-rank means, and `metrics.jsonl`.

A step records values under the names below (`SAPOTrainer._record`, or straight into `trainer._metrics`); device
tensors stay on the device until the next log, when `reduced_metrics` brings them to the host in one transfer and
averages each name over the ranks that recorded it. The main process appends each logged row to
`output_dir/metrics.jsonl` (`append_metrics_rows`).

`metrics.jsonl` is read back only here, with one rule for a damaged file: a torn last line (a write cut short by a
crash or a full disk) is dropped quietly, an unreadable line elsewhere with a warning (`read_metrics`). A checkpoint
keeps the rows logged up to its step (`save_metrics_rows`), and a resume brings the file back to that step
(`restore_metrics`, `truncate_metrics`).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sapo.run.paths import METRICS_FILE
from sapo.run.publish import _write_durably, atomic_write_text

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The registry of metric names. Every module that records or reads a metric names it through these constants
# (tests/test_metrics.py fails on a metric-name string literal anywhere else in src/sapo).
# ------------------------------------------------------------------------------------------------

# TRL's names (DPOTrainer, ORPOTrainer, SFTTrainer of TRL 1.16), with TRL's definitions (docs/guides/outputs.md).
LOSS = "loss"
NLL_LOSS = "nll_loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARD_MARGINS = "rewards/margins"
REWARD_ACCURACIES = "rewards/accuracies"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
LOGITS_CHOSEN = "logits/chosen"
LOGITS_REJECTED = "logits/rejected"
ENTROPY = "entropy"
MEAN_TOKEN_ACCURACY = "mean_token_accuracy"
LOG_ODDS_RATIO = "log_odds_ratio"  # ORPO
LOG_ODDS_CHOSEN = "log_odds_chosen"  # ORPO

# SAPO's own names, for what TRL does not log.
REWARD_TIES = "rewards/ties"
LOGPS_CHOSEN_PER_TOKEN = "logps/chosen_per_token"  # evaluation
LENGTH_CHOSEN = "length/chosen"
LENGTH_REJECTED = "length/rejected"
BUFFER_SIZE = "buffer/size"
BUFFER_MEAN_TIMES_SAMPLED = "buffer/mean_times_sampled"
PAIRS_DROPPED = "pairs/dropped"
PAIRS_JUDGED_NOT_WORSE = "pairs/judged_not_worse"
SEGMENT_IDENTICAL_FRACTION = "segment/identical_fraction"
SEGMENT_REPLACED_LENGTH = "segment/replaced_length"
SEGMENT_START = "segment/start"
SPIN_ITERATION = "spin/iteration"
SPIN_BETA = "spin/beta"
NONFINITE_SKIPPED_STEPS = "nonfinite/skipped_steps"
NO_SIGNAL_SKIPPED_STEPS = "steps/skipped_no_signal"
REFERENCE_CACHED_FRACTION = "ref/cached_fraction"
REFERENCE_REFRESHES = "ref/refreshes"  # recorded to count refreshes between logs; not logged itself
GENERATION_SHARE = "time/generation_share"
GENERATION_TOKENS_PER_SECOND = "generation/tokens_per_second"
JUDGE_SCORE = "judge/score"  # evaluation

# Keys the Trainer itself writes into a row.
STEP = "step"
EPOCH = "epoch"
GRAD_NORM = "grad_norm"
LEARNING_RATE = "learning_rate"
TRAIN_RUNTIME = "train_runtime"
EVAL_PREFIX = "eval_"
"""Evaluation metrics are logged as `eval_<name>`, or `eval_<set>_<name>` for named eval sets (`eval_name`)."""

RENAMED = {"rewards/real": REWARDS_CHOSEN, "logps/real": LOGPS_CHOSEN, "length/real": LENGTH_CHOSEN,
           "logps/real_per_token": LOGPS_CHOSEN_PER_TOKEN}
"""Names sapo logged before it took TRL's (sapo <= 0.x: the dataset response was "real"): `read_metrics` reads them
under the new names, so the runs of an older sapo plot and compare with new ones."""

# What the training progress bar shows, by metric name.
LIVE_METRICS = {LOSS: "loss", REWARD_MARGINS: "margin", REWARD_ACCURACIES: "acc", BUFFER_SIZE: "buffer",
                GENERATION_TOKENS_PER_SECOND: "gen tok/s"}


def eval_name(name: str, eval_set: str | None = None) -> str:
    """An evaluation metric's key as the Trainer logs it: `eval_<name>`, or `eval_<set>_<name>` for a named set."""
    return f"{EVAL_PREFIX}{'' if eval_set is None else f'{eval_set}_'}{name}"


def current_name(key: str) -> str:
    """`key` under today's name: a `RENAMED` name (bare, `eval_`, or `eval_<set>_` prefixed) becomes the new one."""
    for old, new in RENAMED.items():
        if key == old:
            return new
        if key.startswith(EVAL_PREFIX) and key.endswith(old) and (
                len(key) == len(EVAL_PREFIX) + len(old) or key[-len(old) - 1] == "_"):
            return key[: -len(old)] + new
    return key


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with every old name (`RENAMED`) read as its new one; a row already using the new name keeps it."""
    upgraded = {current_name(key): value for key, value in row.items() if current_name(key) == key}
    for key, value in row.items():
        upgraded.setdefault(current_name(key), value)
    return upgraded


# What a log line shows when the progress bar is off (`disable_tqdm`), in this order; metrics.jsonl keeps them all.
LINE_METRICS = (LOSS, NLL_LOSS, REWARD_MARGINS, REWARD_ACCURACIES, BUFFER_SIZE, GENERATION_TOKENS_PER_SECOND,
                GRAD_NORM, LEARNING_RATE)
EVAL_LINE_METRICS = tuple(eval_name(name) for name in (LOSS, REWARD_MARGINS, REWARD_ACCURACIES, LOGPS_CHOSEN_PER_TOKEN,
                                                       JUDGE_SCORE))
END_LINE_METRICS = ("train_runtime", "train_loss", "train_steps_per_second")
# Counts, logged as their mean since the last log (over steps and ranks): shown as whole numbers
COUNT_METRICS = {BUFFER_SIZE, GENERATION_TOKENS_PER_SECOND}
SHORT_NAMES = {LEARNING_RATE: "lr"}


def log_line(logs: Mapping[str, Any], step: int, max_steps: int) -> str:
    """One short line for a logged row: `step 40/120 | loss 0.512 | rewards/margins 0.31 | ... | lr 1.2e-04` for a
    training row, `... eval | eval_loss ...` for an evaluation, `... end | train_runtime ...` for the run's summary."""
    if any(key.startswith("eval_") for key in logs):
        kind, names = " eval", EVAL_LINE_METRICS
    elif "train_runtime" in logs:
        kind, names = " end", END_LINE_METRICS
    else:
        kind, names = "", LINE_METRICS
    shown = [f"{SHORT_NAMES.get(name, name)} {_number(name, logs[name])}" for name in names
             if isinstance(logs.get(name), numbers.Real)]
    return " | ".join([f"step {step}/{max_steps}{kind}", *shown])


def _number(name: str, value: float) -> str:
    if name in COUNT_METRICS or isinstance(value, numbers.Integral):
        return str(round(value))
    if name == LEARNING_RATE:
        return f"{value:.1e}"
    if name == "train_runtime":
        return f"{value:.1f} s"
    return f"{value:.3g}"


def append_metrics_rows(trainer: Any, records: list[dict[str, Any]]) -> None:
    """Append logged rows to the run's metrics.jsonl (main process only)."""
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    with open(os.path.join(trainer.args.output_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))


def metric_values(trainer: Any) -> dict[str, list[float]]:
    """The recorded metrics as numbers: the device tensors the steps left are brought to the host in one
    transfer (the only synchronisation they cost)."""
    tensors = [v for values in trainer._metrics.values() for v in values if isinstance(v, torch.Tensor)]
    synced = iter(torch.stack([t.detach().float() for t in tensors]).tolist() if tensors else [])
    return {name: [next(synced) if isinstance(v, torch.Tensor) else v for v in values]
            for name, values in trainer._metrics.items()}


def reduced_metrics(trainer: Any) -> dict[str, float]:
    """Means since the last log, averaged over the ranks that recorded each metric (a rank may record one that
    another does not: `rewards/accuracies` where every pair it drew was a tie, pair metrics where it had only
    stand-in pairs), so every rank reduces the same list of names."""
    metrics = metric_values(trainer)
    names = sorted(metrics)
    if trainer.args.world_size > 1:
        from accelerate.utils import gather_object

        names = sorted(set().union(*gather_object([names])))
    means = [sum(metrics[n]) / len(metrics[n]) if metrics.get(n) else 0.0 for n in names]
    recorded = [1.0 if metrics.get(n) else 0.0 for n in names]
    local = torch.tensor([means, recorded], device=trainer.args.device, dtype=torch.float64)
    total, ranks = trainer.accelerator.reduce(local, reduction="sum").tolist()
    reduced = {n: value / count for n, value, count in zip(names, total, ranks, strict=True) if count > 0}
    reduced.pop(REFERENCE_REFRESHES, None)
    if trainer._timing["step"] > 0:
        reduced[GENERATION_SHARE] = trainer._timing["generation"] / trainer._timing["step"]
    if trainer._timing["generation"] > 0:
        reduced[GENERATION_TOKENS_PER_SECOND] = trainer._timing["generated_tokens"] / trainer._timing["generation"]
    trainer._metrics.clear()
    trainer._timing = {"generation": 0.0, "step": 0.0, "generated_tokens": 0.0}
    return reduced


# ------------------------------------------------------------------------------------------------
# metrics.jsonl
# ------------------------------------------------------------------------------------------------


def _metrics_lines(path: Path) -> list[tuple[bytes, dict[str, Any]]]:
    """Each readable line with its row. A torn last line (a write cut short by a crash or a full disk) is dropped;
    an unreadable line elsewhere (not UTF-8, not a JSON object, nested too deep) is dropped with a warning naming
    it."""
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if number == len(lines):
                logger.info("%s: dropping a torn last line (a write cut short)", path)
            else:
                reason = " ".join(str(error).split())[:120] or type(error).__name__
                logger.warning("%s:%d: dropping an unreadable line (%s)", path, number, reason)
            continue
        rows.append((line, row))
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, tolerating a torn last line, with the names of an older sapo read as today's
    (`upgrade_row`)."""
    return [upgrade_row(row) for _, row in _metrics_lines(path)]


def is_summary_row(row: Mapping[str, Any]) -> bool:
    """The Trainer's end-of-training row (runtime, mean loss), logged after the last step."""
    return TRAIN_RUNTIME in row


def truncate_metrics(path: Path, keep_until_step: int, *, keep_summary: bool = False) -> None:
    """Keep the rows a run resumed from step `keep_until_step` would have logged by then, so its metrics.jsonl reads
    as if it had never stopped: rows of earlier steps, and at that step the logging row but not an end-of-training
    row (unless `keep_summary`: the resumed run is already finished). 0 empties the file (a fresh run). The file is
    replaced atomically."""
    kept = [line for line, row in _metrics_lines(path) if keep_until_step > 0 and (
        row.get(STEP, 0) < keep_until_step
        or (row.get(STEP, 0) == keep_until_step and (keep_summary or not is_summary_row(row))))]
    atomic_write_text(path, "".join(line.decode("utf-8") + "\n" for line in kept))


def save_metrics_rows(live: Path, target: Path, step: int) -> None:
    """Copy into a checkpoint the rows of `live` (metrics.jsonl) logged up to its `step`, so a resume restores
    them even when metrics.jsonl was deleted or damaged meanwhile."""
    rows = _metrics_lines(live) if live.is_file() else []
    _write_durably(target, "".join(line.decode("utf-8") + "\n" for line, row in rows
                                   if row.get(STEP, 0) <= step and not is_summary_row(row)))


def restore_metrics(live: Path, saved: Path, step: int, *, keep_summary: bool = False) -> None:
    """Bring metrics.jsonl back to a resumed `step`: the rows the checkpoint holds (`saved`), plus, with
    `keep_summary`, the end-of-training row at that step; a checkpoint without its rows (an older sapo) truncates
    the file instead (`truncate_metrics`)."""
    if not saved.is_file():
        if live.exists():
            truncate_metrics(live, step, keep_summary=keep_summary)
        return
    kept = [line for line, _ in _metrics_lines(saved)]
    present = [line for line, row in _metrics_lines(live) if row.get(STEP, 0) <= step] if live.is_file() else []
    if [line for line in present if line in set(kept)] != kept:
        logger.warning("%s: %s; the %d rows up to step %d are restored from the checkpoint", live,
                       "missing" if not live.exists() else "rows were lost or damaged", len(kept), step)
    if keep_summary:
        kept += [line for line in present if is_summary_row(json.loads(line)) and json.loads(line).get(STEP) == step]
    atomic_write_text(live, "".join(line.decode("utf-8") + "\n" for line in kept))
