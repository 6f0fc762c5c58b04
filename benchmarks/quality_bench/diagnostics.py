"""What moved and why: the generator's census of its rewrites, the fixed pairs' log-probabilities against the
start, the parameter distance, the replay buffer's contents and the metrics sapo logged."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sapo import metrics as m


def tokenized_pairs(trainer: Any, records: Sequence[dict]) -> list[tuple[dict, list[int], list[int]]]:
    """(record, prompt ids, response ids) as the trainer tokenized them (its own train_dataset)."""
    from sapo import tasks

    tokenizer = trainer.processing_class
    by_prompt = {tasks.prompt_of(r): r for r in records}
    rows = []
    for item in trainer.train_dataset:
        record = by_prompt.get(tokenizer.decode(item["prompt_ids"], skip_special_tokens=True))
        if record is not None:
            rows.append((record, list(item["prompt_ids"]), list(item["response_ids"])))
    return rows


def rewrite_census(trainer: Any, rows: Sequence[tuple[dict, list[int], list[int]]], seed: int) -> dict[str, Any]:
    """The trainer's generator (its EMA model, at its temperature) rewrites a segment of each real answer exactly
    as training does (`sapo.segments.rewrite_segments`), before any identical-pair handling. Per family: the
    fraction identical to the real answer, the fraction the task judge scores below it, where segments start
    (fraction of the response); and every rewrite, for the fixed pairs."""
    import random
    from functools import partial

    from sapo import tasks
    from sapo.copies import EMA
    from sapo.segments import rewrite_segments

    args, tokenizer = trainer.args, trainer.processing_class
    rewrites = rewrite_segments([r[1] for r in rows], [r[2] for r in rows], partial(trainer._generate, EMA),
                                token_generate_length=args.token_generate_length, max_length=args.max_length,
                                eos_token_ids=trainer.eos_token_ids, rng=random.Random(seed))
    per_family: dict[str, list[tuple[float, float, float]]] = {}
    pairs = []
    for rewrite in rewrites:
        record, prompt, real = rows[rewrite.example]
        text = tokenizer.decode(rewrite.rejected, skip_special_tokens=True)
        prompt_text = tasks.prompt_of(record)
        worse = tasks.judge(prompt_text, text, record) < tasks.judge(prompt_text, record["reference"], record)
        identical = list(rewrite.rejected) == list(real)
        per_family.setdefault(record["task"], []).append(
            (float(identical), float(worse), rewrite.segment_start / max(1, len(real))))
        pairs.append({"family": record["task"], "prompt": prompt, "real": real, "rejected": list(rewrite.rejected),
                      "identical": identical})
    families = {family: {"n": len(v), "identical": statistics.fmean(x[0] for x in v),
                         "judged_worse": statistics.fmean(x[1] for x in v),
                         "segment_start": statistics.fmean(x[2] for x in v)} for family, v in per_family.items()}
    return {"families": families, "pairs": pairs}


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]],
                   batch_size: int = 32) -> list[float]:
    """Summed log-probability of each response given its prompt (right-padded batches, response tokens only)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        width = max(len(p) + len(y) for p, y in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (p, y) in enumerate(chunk):
            ids[i, :len(p) + len(y)] = torch.tensor(list(p) + list(y))
            mask[i, :len(p) + len(y)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        for i, (p, y) in enumerate(chunk):
            out.append(float(logps[i, len(p) - 1:len(p) + len(y) - 1].sum()))
    model.train(was_training)
    return out


def fixed_pair_scores(model: torch.nn.Module, pairs: Sequence[dict]) -> dict[str, list[float]]:
    """log p(real) and log p(rejected) of every fixed pair under `model`."""
    return {"real": sequence_logps(model, [(p["prompt"], p["real"]) for p in pairs]),
            "rejected": sequence_logps(model, [(p["prompt"], p["rejected"]) for p in pairs])}


def probe_of(start: dict[str, Any], start_model: torch.nn.Module) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """Fixed-pair diagnostics of a model against the FIXED start (never a refreshed reference): per family, the
    margin ((log p(y) - log p0(y)) - (log p(y-) - log p0(y-)), nats; the DPO reward margin / beta) and its
    accuracy over the start's non-identical rewrites, the change of the real answers' per-token log-likelihood;
    and the parameter distance from the start (L2, and relative to the start's norm)."""
    pairs, base = start["pairs"], start["scores"]
    initial = {name: p.detach().clone() for name, p in start_model.named_parameters()}
    norm = math.sqrt(sum(float(p.pow(2).sum()) for p in initial.values()))

    def probe(model: torch.nn.Module) -> dict[str, Any]:
        now = fixed_pair_scores(model, pairs)
        families: dict[str, dict[str, list[float]]] = {}
        for i, pair in enumerate(pairs):
            values = families.setdefault(pair["family"], {"margin": [], "real_change": []})
            values["real_change"].append((now["real"][i] - base["real"][i]) / len(pair["real"]))
            if not pair["identical"]:
                values["margin"].append((now["real"][i] - base["real"][i]) - (now["rejected"][i] - base["rejected"][i]))
        distance = math.sqrt(sum(float((p.detach() - initial[name]).pow(2).sum())
                                 for name, p in model.named_parameters() if name in initial))
        return {"distance": distance, "relative_distance": distance / norm, "families": {
            family: {"real_change": statistics.fmean(v["real_change"]),
                     "margin": statistics.fmean(v["margin"]) if v["margin"] else math.nan,
                     "accuracy": statistics.fmean(m > 0 for m in v["margin"]) if v["margin"] else math.nan}
            for family, v in families.items()}}

    return probe


def trained_prompts(trainer: Any) -> list[str]:
    """The prompt of every example in the trainer's own (tokenized) training set, decoded: what it was given."""
    tokenizer = trainer.processing_class
    return [tokenizer.decode(item["prompt_ids"], skip_special_tokens=True) for item in trainer.train_dataset]


LOGGED = {m.REWARD_TIES: "mean", m.SEGMENT_IDENTICAL_FRACTION: "mean", m.PAIRS_JUDGED_NOT_WORSE: "mean",
          m.PAIRS_DROPPED: "last", m.NO_SIGNAL_SKIPPED_STEPS: "last", m.SEGMENT_START: "mean"}
"""Training metrics kept per run (sapo logs them; absent from older versions and from recipes without them)."""


def logged_diagnostics(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    result = {}
    for name, how in LOGGED.items():
        values = [row[name] for row in history if name in row]
        if values:
            result[name] = values[-1] if how == "last" else statistics.fmean(values)
    return result


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


def census_mean(families: dict[str, dict[str, float]], name: str) -> float:
    """Mean of one census statistic over the families, weighted by their counts."""
    total = sum(f["n"] for f in families.values())
    return sum(f[name] * f["n"] for f in families.values()) / max(1, total)
