"""Metrics: the names a run logs, how values are recorded between logs, their cross-rank means, and `metrics.jsonl`.

A step records values under the names below (`SAPOTrainer._record`, or straight into `trainer._metrics`); device
tensors stay on the device until the next log, when `reduced_metrics` brings them to the host in one transfer and
averages each name over the ranks that recorded it. The main process appends each logged row to
`output_dir/metrics.jsonl` (`append_metrics_rows`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from sapo.layout import METRICS_FILE

# The names of the metrics the trainer itself logs (the recipes, losses and scoring log theirs under the same
# families: `rewards/*`, `logps/*`, `length/*`, `buffer/*`, `segment/*`, `pairs/*`, `spin/*`).
LOSS = "loss"
NLL_LOSS = "nll_loss"
REWARD_MARGINS = "rewards/margins"
REWARD_ACCURACIES = "rewards/accuracies"
BUFFER_SIZE = "buffer/size"
NONFINITE_SKIPPED_STEPS = "nonfinite/skipped_steps"
NO_SIGNAL_SKIPPED_STEPS = "steps/skipped_no_signal"
REFERENCE_REFRESHES = "ref/refreshes"  # recorded to count refreshes between logs; not logged itself
GENERATION_SHARE = "time/generation_share"
GENERATION_TOKENS_PER_SECOND = "generation/tokens_per_second"
JUDGE_SCORE = "judge/score"

# What the training progress bar shows, by metric name.
LIVE_METRICS = {LOSS: "loss", REWARD_MARGINS: "margin", REWARD_ACCURACIES: "acc", BUFFER_SIZE: "buffer",
                GENERATION_TOKENS_PER_SECOND: "gen tok/s"}


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
