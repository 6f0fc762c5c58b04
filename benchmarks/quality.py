"""Quality benchmark in the paper's shape: a start fine-tuned on one split of demonstrations, then SAPO and its
peers on a disjoint split of NEW demonstrations of the same families, with ablations of SAPO's parts.

    python benchmarks/quality.py --quick            # the same protocol, reduced: about 4 CPU-minutes
    python benchmarks/quality.py --full             # docs/results/quality.md's run (~60 min on 2 idle cores)
    python benchmarks/quality.py --full --out DIR   # outputs elsewhere (default runs/quality, runs/quality-quick)

Protocol (identical for every run, so that only the recipe or the ablated part differs):

* Data: the structured task families of :mod:`sapo.tasks` (``chain``: worked multi-step sums; ``listing``:
  numbered sorts and reversals; ``profile``: facts as sentences; ``format``: lines under several checkable
  constraints), whose judges give partial credit. Two sides: the START's demonstrations and the NEW ones, on
  disjoint prompts. Under the default split rule ``harder`` the new side is the larger instances of every family
  (``HARDER_FROM``: chains of 6-7 numbers, lists of 8-9 words, 5 facts, 5 lines) and the start's side the smaller
  ones; under ``same`` both sides are one distribution split by a hash of the prompt. Dev (choices) and
  held-out (the table) prompts are new-side and disjoint from both training sides by the suite's hash split.
* Why ``harder``: the paper's SAPO gets demonstrations its start has not learned. A disjoint split of the same
  distribution is what the old protocol's held-out split already was, and a converged start scored 0.827 there
  (profile 0.994): it rewrote 51% of its answers into themselves (profile 100%, chain 72%), and an identical
  pair carries no gradient. Training the start less on the same distribution would make every recipe's gain
  the SFT it skipped. Larger instances of the learned families are new to the start and stay in reach of the
  same skills. The start's census (below) measures it before anything long runs: at ``--quick`` size, 0% of
  the start's rewrites of the new side are identical under either rule (its start is weak); the run stops when
  more than ``max_start_identical`` are (the ``--full`` start's figure is in its table).
* Start: ONE SFT checkpoint (tiny Llama, ``hidden_size`` x ``num_layers``) trained on the start's side only with a
  cosine schedule; its dev score on both sides every ``sft_eval_every`` steps (the SFT curves). Shared by every
  run, cached in ``OUT/sft``. Its census of the new side: its segment rewrites of ``diagnostic_per_family`` new
  training records per family, made exactly as SAPO's generator makes them (``sapo.segments.rewrite_segments``
  through the trainer's sampler), at each of ``census_temperatures``: identical to the real answer, judged
  worse. Its rewrites at the base temperature are the FIXED pairs of the diagnostics.
* Recipes from that checkpoint, all on the same new demonstrations: ``sft`` (continued SFT: the baseline SAPO
  must beat), ``dpo`` and ``orpo`` (offline, on the records' near-miss ``rejected`` answers), ``spin``,
  ``sapo-dpo``, ``sapo-orpo``, and ``sapo-rpo`` (SAPO-DPO plus the real answers' NLL at weight 1, sapo's
  ``nll_weight``: RPO's term). Equal optimizer steps, batch, schedule (AdamW, linear warm-up then linear decay
  to 0, as in the paper) and lengths.
* Grid: each recipe's learning rate (and beta, when ``grid_betas`` has several) is chosen on dev (seed 0). When a
  recipe's best dev score is at the lowest or highest learning rate tried, the grid grows one step past that
  edge (the edge times its ratio to its neighbour), up to ``grid_widen`` times; a recipe still at an edge is
  marked so in the table. The chosen setting then runs with every seed on held-out prompts.
* Ablations, from ``sapo-dpo`` with its chosen setting (seeds ``ablation_seeds``, default all): identical-pair
  handling off (``keep``: the paper, identical rewrites enter the buffer and every step runs), step skipping off
  (``no-skip``) and on with identical pairs kept (``keep-skip``), segment vs whole response (``whole``), EMA vs the
  current policy as generator (``no-ema``), temperature 0.3 / 1.0 (``T0.3``, ``T1``; base 0.7), and the judge
  filter beyond the paper (``judge``: ``rejected_judge`` = the task judge, a rewrite kept only when scored below
  the real answer). More are available by name (``G12``, ``no-replay``, ``ref-policy``, ``ref-fixed``...).
* Evaluation: greedy decoding, scored by ``sapo.tasks.judge``, every ``eval_every`` steps and after the last.
  Scores are at equal steps (the last step) and at equal wall time (interpolated on the curve at the training
  time of the fastest recipe of the same seed; evaluation excluded). Win rates are per held-out prompt against
  the start, a tie counting half. Rows give mean ± sample std over seeds.
* Diagnostics, at every evaluation point, against the FIXED start (never a reference refreshed at the
  evaluation step): per family, the real answers' per-token log-likelihood change on the census records, the
  margin (log p(y) - log p0(y)) - (log p(y-) - log p0(y-)) on the start's non-identical rewrites and its
  accuracy; the parameter distance from the start. From sapo's training logs: the identical fraction before
  handling, ties, pairs dropped, pairs judged not worse, steps skipped. For SAPO runs, per family: the census
  of the final generator (identical, judged worse) and of the final replay buffer (segment start, judged worse).

Outputs in ``--out``: ``results.json``, ``table.md`` (also printed), ``curves.png``, ``diagnostics.png``, ``sft/``
(the checkpoint, ``start.json`` with its census and fixed pairs, ``trained_prompts.json``) and
``runs/GROUP/NAME/seed-N/`` (``result.json``, reused by a later invocation when its settings match,
``trained_prompts.json``: the prompts the run's trainer was given, decoded from its own training set, and
``metrics.jsonl`` for ``sapo plot``). Runs go to ``--workers`` processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sapo import metrics as m

RECIPES: tuple[str, ...] = ("sft", "dpo", "orpo", "spin", "sapo-dpo", "sapo-orpo", "sapo-rpo")
SAPO_RECIPES = ("sapo-dpo", "sapo-orpo", "sapo-rpo")
RECIPE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"sapo-rpo": ("sapo-dpo", {"nll_weight": 1.0})}
"""Benchmark recipes that are a sapo recipe with settings: ``sapo-rpo`` is SAPO-DPO plus the real answers' NLL at
weight 1 (RPO's recommended alpha), to test whether the reference-based recipes lack the likelihood term."""
BASE = "sapo-dpo"  # the recipe the ablations start from
START = "sft checkpoint (start)"
SUITE_SEED = 0
SPLIT_RULES = ("harder", "same")
HARDER_FROM: dict[str, int] = {"chain": 6, "listing": 8, "profile": 5, "format": 5}
"""The "harder" rule: a record belongs to the new demonstrations when its size (``params["n"]``: numbers to add,
words to order, facts to state, lines to write) is at least this; the start learns the smaller ones."""


@dataclass
class Settings:
    """Defaults are the --full run; QUICK overrides some of them."""

    out: str = "runs/quality"
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0, 1)  # () = the same seeds as the recipes (3 seeds: about 12 min more)
    recipes: tuple[str, ...] = RECIPES
    ablations: tuple[str, ...] = ("keep", "keep-skip", "no-skip", "whole", "no-ema", "T0.3", "T1", "judge")
    families: tuple[str, ...] = ("chain", "listing", "profile", "format")
    split_rule: str = "harder"  # how the recipes' new demonstrations differ from the start's (SPLIT_RULES)
    n_start: int = 6000  # the start's demonstrations
    n_train: int = 2000  # the new demonstrations every recipe trains on (disjoint from the start's)
    n_dev: int = 150
    n_heldout: int = 250
    # model and the SFT start
    hidden_size: int = 128
    num_layers: int = 3
    sft_steps: int = 1000
    sft_batch_size: int = 32
    sft_learning_rate: float = 2e-3
    sft_eval_every: int = 250
    # the post-SFT stage, shared by every run
    steps: int = 120
    batch_size: int = 16
    warmup_steps: int = 10
    lr_scheduler: str = "linear"  # warm-up, then linear decay to 0 at the last step (the paper's schedule)
    grid_learning_rates: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    grid_betas: tuple[float, ...] = (0.1,)
    grid_widen: int = 2  # times the grid may grow past an edge that holds a recipe's best dev score
    # per recipe, "recipe=lr[,lr...]": the learning rates its grid starts from instead of grid_learning_rates; one
    # rate (with one beta) pins the recipe to it, untuned here (e.g. a value chosen by an earlier run's grid)
    recipe_learning_rates: tuple[str, ...] = ()
    token_generate_length: int = 24
    temperature: float = 0.7
    ref_update_steps: int = 50
    spin_iterations: int = 3
    max_length: int = 256
    max_prompt_length: int = 96
    # evaluation and diagnostics
    eval_every: int = 60
    max_new_tokens: int = 170
    eval_batch_size: int = 100
    diagnostic_per_family: int = 24  # new-split training records per family: census and fixed pairs
    census_temperatures: tuple[float, ...] = (0.3, 0.7, 1.0)
    max_start_identical: float = 0.5  # stop before the grid when more of the start's rewrites are identical
    workers: int = 2


QUICK: dict[str, Any] = {
    "seeds": (0, 1), "ablation_seeds": (0,), "n_start": 3000, "n_train": 600, "n_dev": 60, "n_heldout": 64,
    "hidden_size": 64, "num_layers": 2, "sft_steps": 300, "sft_eval_every": 300, "steps": 24, "eval_every": 24,
    "grid_learning_rates": (3e-4,), "ref_update_steps": 12, "diagnostic_per_family": 8,
    "census_temperatures": (0.7,),
}
"""--quick: the same protocol reduced (a one-point grid is not run; its point is every recipe's setting)."""


def ablation_settings(name: str, settings: Settings) -> dict[str, Any]:
    """SAPOConfig overrides of one ablation, relative to the base recipe's run (sapo's defaults: a rewrite
    identical to the real answer is resampled, then dropped; a step with no signal on any rank is skipped)."""
    table: dict[str, dict[str, Any]] = {
        "keep": {"identical_rejected": "keep"},  # the paper: identical pairs enter the buffer, every step runs
        "keep-skip": {"identical_rejected": "keep", "skip_no_signal_steps": True},
        "no-skip": {"skip_no_signal_steps": False},
        "whole": {"token_generate_length": settings.max_length},  # G >= len(y), so k = 0 and G = len(y)
        "G12": {"token_generate_length": 12},
        "G48": {"token_generate_length": 48},
        "no-ema": {"ema_beta": 0.0},
        "no-replay": {"max_replay_buffer_size": settings.batch_size, "generation_batch_size": settings.batch_size},
        "ref-policy": {"ref_update_mode": "policy"},
        "ref-fixed": {"ref_update_mode": "fixed"},
        "T0.3": {"temperature": 0.3},
        "T1": {"temperature": 1.0},
        "judge": {"rejected_judge": "sapo.tasks:judge"},
    }
    if name not in table:
        raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(table)}")
    return table[name]


ABLATION_TEXT = {
    "keep": "the paper: identical rewrites kept, every step taken",
    "keep-skip": "identical rewrites kept, steps without signal skipped",
    "no-skip": "identical rewrites resampled/dropped, every step taken",
    "whole": "whole-response rewrite (k = 0, G = len(y))",
    "G12": "segment G = 12 tokens",
    "G48": "segment G = 48 tokens",
    "no-ema": "current policy as generator (ema_beta = 0)",
    "no-replay": "no replay: buffer = one batch of fresh pairs, generated every step",
    "ref-policy": "reference refreshed from the policy",
    "ref-fixed": "fixed reference (the SFT checkpoint)",
    "T0.3": "EMA samples at temperature 0.3",
    "T1": "EMA samples at temperature 1.0",
    "judge": "judge filter: a rewrite kept only when the task judge scores it below the real answer",
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
# Data: the start's demonstrations and the new ones
# ------------------------------------------------------------------------------------------------


def is_new(record: dict[str, Any], rule: str) -> bool:
    """Whether a record belongs to the recipes' new demonstrations (else to the start's) under `rule`: "harder"
    by its size (HARDER_FROM), "same" by a hash of its prompt (same distribution, disjoint prompts)."""
    from sapo import tasks

    if rule == "harder":
        return record["params"]["n"] >= HARDER_FROM[record["task"]]
    digest = hashlib.sha256(("sapo.quality/new/" + tasks.prompt_of(record)).encode()).digest()
    return digest[0] % 2 == 1


def _share(total: int, index: int, parts: int) -> int:
    return total // parts + (index < total % parts)


def _drawn(family: str, split: str, rule: str, want_start: int, want_new: int) -> tuple[list[dict], list[dict]]:
    """The first `want_start` start-side and `want_new` new-side records of one family's hash split."""
    from sapo import tasks

    size = 2 * (want_start + want_new) + 50
    while True:
        pool = tasks.make_records(family, size, seed=SUITE_SEED, split=split)
        new = [r for r in pool if is_new(r, rule)]
        old = [r for r in pool if not is_new(r, rule)]
        if len(new) >= want_new and len(old) >= want_start:
            return old[:want_start], new[:want_new]
        size *= 2


SUITE_KEYS = ("families", "split_rule", "n_start", "n_train", "n_dev", "n_heldout")


def suite_of(settings: Settings) -> dict[str, list[dict]]:
    """`start`: the start's demonstrations; `train`: the new ones every recipe trains on; `dev` and `heldout`:
    new-side prompts for choices and for the table. The prompts of the four splits are disjoint. Drawn once and
    kept in `OUT/suite.json`, which every worker reads (drawing takes seconds, reading milliseconds)."""
    if settings.split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split_rule {settings.split_rule!r}; choose from {', '.join(SPLIT_RULES)}")
    path = Path(settings.out) / "suite.json"
    key = _key(settings, SUITE_KEYS)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["suite"]
    suite = draw_suite(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_file = path.with_suffix(f".{os.getpid()}.tmp")
    partial_file.write_text(json.dumps({"key": key, "suite": suite}), encoding="utf-8")
    partial_file.replace(path)  # whole or not at all, should two processes draw at once
    return suite


def draw_suite(settings: Settings) -> dict[str, list[dict]]:
    """The four splits, drawn from the task generators (see `suite_of`)."""
    import random

    parts = len(settings.families)
    suite: dict[str, list[dict]] = {"start": [], "train": [], "dev": [], "heldout": []}
    for index, family in enumerate(settings.families):
        old, new = _drawn(family, "train", settings.split_rule, _share(settings.n_start, index, parts),
                          _share(settings.n_train, index, parts))
        suite["start"] += old
        suite["train"] += new
        for split, total in (("dev", settings.n_dev), ("heldout", settings.n_heldout)):
            suite[split] += _drawn(family, split, settings.split_rule, 0, _share(total, index, parts))[1]
    for split, records in suite.items():
        random.Random(f"sapo.quality/{split}").shuffle(records)
    return suite


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
                    tokenizer_of: Callable[[], Any], probe: Callable[[Any], dict[str, Any]] | None = None):
    """A TrainerCallback judging the model every `every` steps and after the last (and, with `probe`, adding
    its fixed-pair diagnostics to the point); its clock excludes judging and probing."""
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
                point = _point(step, seconds, self.last)
                if probe is not None:
                    point["probe"] = probe(model_of())
                self.points.append(point)
                self.judging += time.perf_counter() - clock

    return Curve()


# ------------------------------------------------------------------------------------------------
# Diagnostics: the start's rewrites of the new demonstrations, fixed pairs, distance moved
# ------------------------------------------------------------------------------------------------


def diagnostic_records(settings: Settings, suite: dict[str, list[dict]]) -> list[dict]:
    """The first `diagnostic_per_family` new training records of each family: the census's and fixed pairs'."""
    return [r for family in settings.families
            for r in [r for r in suite["train"] if r["task"] == family][:settings.diagnostic_per_family]]


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


def census_trainer(settings: Settings, root: Path, records: Sequence[dict], temperature: float) -> Any:
    """A sapo-dpo trainer on the start, built only for its generator (nothing is trained)."""
    from sapo.trainer import SAPOTrainer

    spec = RunSpec("start", "census", BASE, SUITE_SEED, settings.grid_learning_rates[0], settings.grid_betas[0],
                   "dev", (("temperature", temperature),))
    return SAPOTrainer(model=str(root / "sft"), args=config_of(spec, settings, root / spec.directory),
                       train_dataset=list(records))


def start_census(settings: Settings, suite: dict[str, list[dict]], root: Path) -> dict[str, Any]:
    """The start on the new demonstrations: its rewrites' census at each census temperature, the fixed pairs
    (its rewrites at the base temperature) and their log-probabilities under it; cached in `start.json`."""
    path = root / "sft" / "start.json"
    key = {"sft": _key(settings, SFT_KEYS), "census": _key(settings, CENSUS_KEYS)}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
    records = diagnostic_records(settings, suite)
    result: dict[str, Any] = {"key": key, "census": {}}
    for temperature in sorted({*settings.census_temperatures, settings.temperature}):
        trainer = census_trainer(settings, root, records, temperature)
        census = rewrite_census(trainer, tokenized_pairs(trainer, records), SUITE_SEED)
        result["census"][f"{temperature:g}"] = census["families"]
        if temperature == settings.temperature:
            result["pairs"] = census["pairs"]
            result["scores"] = fixed_pair_scores(trainer.policy, census["pairs"])
    path.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


# ------------------------------------------------------------------------------------------------
# The SFT start
# ------------------------------------------------------------------------------------------------


SFT_KEYS = ("families", "split_rule", "n_start", "n_dev", "hidden_size", "num_layers", "sft_steps",
            "sft_batch_size", "sft_learning_rate", "sft_eval_every", "max_length", "max_prompt_length",
            "max_new_tokens")
CENSUS_KEYS = ("n_train", "diagnostic_per_family", "census_temperatures", "temperature", "token_generate_length")


def _key(settings: Settings, names: Sequence[str]) -> dict[str, Any]:
    return json.loads(json.dumps({name: getattr(settings, name) for name in names}))


def trained_prompts(trainer: Any) -> list[str]:
    """The prompt of every example in the trainer's own (tokenized) training set, decoded: what it was given."""
    tokenizer = trainer.processing_class
    return [tokenizer.decode(item["prompt_ids"], skip_special_tokens=True) for item in trainer.train_dataset]


def start_dev(settings: Settings) -> list[dict]:
    """Dev prompts of the start's own side (its SFT curve shows it learned its demonstrations)."""
    parts = len(settings.families)
    return [r for i, family in enumerate(settings.families)
            for r in _drawn(family, "dev", settings.split_rule, _share(settings.n_dev, i, parts), 0)[0]]


def train_start(settings: Settings, suite: dict[str, list[dict]], directory: Path, log=print) -> dict[str, Any]:
    """The shared SFT checkpoint, trained on the start's demonstrations only, with its dev curves (its own side
    and the new side); reused from `directory` when trained with the same settings."""
    from sapo import tiny
    from sapo.callbacks import LogLines
    from sapo.config import SAPOConfig
    from sapo.trainer import SAPOTrainer

    meta_file = directory / "sft.json"
    key = _key(settings, SFT_KEYS)
    if meta_file.exists() and (directory / "model.safetensors").exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            log(f"SFT checkpoint: reusing {directory} (same settings)")
            return meta
    log(f"SFT checkpoint: {settings.sft_steps} steps on the start's {len(suite['start'])} demonstrations, dev "
        f"curves every {settings.sft_eval_every} steps")
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
    own = _curve_callback(start_dev(settings), settings, settings.sft_eval_every, lambda: model, lambda: tokenizer)
    new = _curve_callback(suite["dev"], settings, settings.sft_eval_every, lambda: model, lambda: tokenizer)
    trainer = SAPOTrainer(model=model, args=args, train_dataset=suite["start"], processing_class=tokenizer,
                          callbacks=[own, new])
    trainer.remove_callback(LogLines)
    trainer.train()
    trainer.save_model()
    losses = [row[m.LOSS] for row in trainer.state.log_history if m.LOSS in row]
    meta = {"key": key, "dir": str(directory), "dev_curve": own.points, "new_dev_curve": new.points,
            "loss_first": losses[0], "loss_last": losses[-1], "seconds": own.training_seconds() - new.judging,
            "parameters": sum(p.numel() for p in model.parameters())}
    meta_file.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (directory / "trained_prompts.json").write_text(json.dumps(trained_prompts(trainer)) + "\n", encoding="utf-8")
    return meta


# ------------------------------------------------------------------------------------------------
# One post-SFT run (executed in a worker process)
# ------------------------------------------------------------------------------------------------


RUN_KEYS = ("split_rule", "n_train", "steps", "batch_size", "warmup_steps", "lr_scheduler", "token_generate_length",
            "temperature", "ref_update_steps", "spin_iterations", "eval_every", "diagnostic_per_family",
            "n_heldout")


def run_key(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    return json.loads(json.dumps({"spec": dataclasses.asdict(spec), "sft": _key(settings, SFT_KEYS),
                                  "run": _key(settings, RUN_KEYS)}))


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


LOGGED = {m.REWARD_TIES: "mean", m.SEGMENT_IDENTICAL_FRACTION: "mean", m.PAIRS_JUDGED_NOT_WORSE: "mean",
          m.PAIRS_DROPPED: "last", m.NO_SIGNAL_SKIPPED_STEPS: "last", m.SEGMENT_START: "mean"}
"""Training metrics kept per run (sapo logs them; absent from older versions and from recipes without them)."""


CONFIG_SHOWN = ("identical_rejected", "skips_no_signal_steps", "rejected_judge", "nll_weight", "temperature",
                "ema_beta", "token_generate_length", "learning_rate", "beta")
"""The settings each run's trainer actually ran with (skips_no_signal_steps: sapo's resolved default)."""


def logged_diagnostics(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    result = {}
    for name, how in LOGGED.items():
        values = [row[name] for row in history if name in row]
        if values:
            result[name] = values[-1] if how == "last" else statistics.fmean(values)
    return result


def execute(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """Train one run from the SFT checkpoint on the new demonstrations; its judged curve with fixed-pair
    diagnostics at every point, final scores, training metrics, the prompts it was given, and for SAPO runs the
    census of its generator's rewrites at the end and of its final replay buffer."""
    from transformers import AutoModelForCausalLM

    from sapo.callbacks import LogLines
    from sapo.trainer import SAPOTrainer

    _quiet()
    torch.set_num_threads(1)
    root = Path(settings.out)
    out = root / spec.directory
    suite = suite_of(settings)
    start = json.loads((root / "sft" / "start.json").read_text())
    probe = probe_of(start, AutoModelForCausalLM.from_pretrained(root / "sft"))
    holder: dict[str, Any] = {}
    curve = _curve_callback(suite[spec.split], settings, settings.eval_every, lambda: holder["trainer"].policy,
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
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
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


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


def recipe_grids(settings: Settings) -> dict[str, tuple[float, ...]]:
    """Per recipe, the learning rates its grid starts from: its `recipe_learning_rates` entry, else the grid's."""
    grids = dict.fromkeys(settings.recipes, settings.grid_learning_rates)
    for entry in settings.recipe_learning_rates:
        recipe, _, rates = entry.partition("=")
        if recipe not in settings.recipes or not rates:
            raise ValueError(f"recipe_learning_rates entry {entry!r}: expected RECIPE=LR[,LR...] with RECIPE one of "
                             f"{', '.join(settings.recipes)}")
        try:
            grids[recipe] = tuple(sorted(float(rate) for rate in rates.split(",")))
        except ValueError:
            raise ValueError(f"recipe_learning_rates entry {entry!r}: {rates!r} is not a list of numbers") from None
    return grids


def pinned(settings: Settings) -> dict[str, tuple[float, float]]:
    """Recipes whose grid is one point (one learning rate, one beta): their setting, with no dev runs."""
    betas = settings.grid_betas
    return {recipe: (rates[0], betas[0]) for recipe, rates in recipe_grids(settings).items()
            if len(rates) == 1 and (len(betas) == 1 or recipe == "sft")}


def grid_specs(settings: Settings, learning_rates: dict[str, Sequence[float]] | None = None) -> list[RunSpec]:
    """Dev runs of seed 0: each recipe at each of its learning rates (default: its grid's, none when pinned) x
    beta (sft: none)."""
    seed = settings.seeds[0]
    specs = []
    grids = recipe_grids(settings)
    fixed = pinned(settings)
    for recipe in settings.recipes:
        betas = settings.grid_betas[:1] if recipe == "sft" else settings.grid_betas
        default = () if recipe in fixed else grids[recipe]
        rates = default if learning_rates is None else learning_rates.get(recipe, ())
        specs += [RunSpec("grid", f"{recipe}_lr{lr:g}_b{beta:g}", recipe, seed, lr, beta, "dev")
                  for lr in rates for beta in betas]
    return specs


def choose(grid: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per recipe, the (learning rate, beta) with the best final dev score (the first listed on a tie)."""
    best: dict[str, dict[str, Any]] = {}
    for run in grid:
        if run["recipe"] not in best or run["final"]["overall"] > best[run["recipe"]]["final"]["overall"]:
            best[run["recipe"]] = run
    return {recipe: (run["learning_rate"], run["beta"]) for recipe, run in best.items()}


def at_edge(grid: Sequence[dict[str, Any]], chosen: dict[str, tuple[float, float]]) -> dict[str, str | None]:
    """Per recipe, "low" or "high" when its chosen learning rate is the smallest or largest it was tried at
    (the optimum may lie beyond), else None."""
    edges: dict[str, str | None] = {}
    for recipe, (lr, _) in chosen.items():
        tried = sorted({run["learning_rate"] for run in grid if run["recipe"] == recipe})
        edges[recipe] = None if len(tried) < 2 else "low" if lr == tried[0] else "high" if lr == tried[-1] else None
    return edges


def widened(grid: Sequence[dict[str, Any]], chosen: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """Per recipe whose best learning rate is at an edge of those tried, the next one beyond it (the edge
    times the ratio to its neighbour, two significant digits)."""
    extra: dict[str, list[float]] = {}
    for recipe, edge in at_edge(grid, chosen).items():
        if edge is None:
            continue
        tried = sorted({run["learning_rate"] for run in grid if run["recipe"] == recipe})
        lr = tried[0] ** 2 / tried[1] if edge == "low" else tried[-1] ** 2 / tried[-2]
        extra[recipe] = [float(f"{lr:.2g}")]
    return extra


def tune(settings: Settings, log=print) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float]]]:
    """The grid's dev runs and each recipe's chosen (learning rate, beta); a one-point grid needs no runs. While a
    recipe's best learning rate is at the edge of those tried, the grid grows past it (at most `grid_widen`
    times); a recipe still at an edge afterwards is reported so."""
    fixed = pinned(settings)
    if len(fixed) == len(settings.recipes):
        log("one-point grid for every recipe, not tuned: " + ", ".join(f"{r} lr {v[0]:g}" for r, v in fixed.items()))
        return [], fixed
    if fixed:
        log("pinned, not tuned here: " + ", ".join(f"{r} lr {v[0]:g}" for r, v in fixed.items()))
    log(f"grid on dev: {len(grid_specs(settings))} runs")
    grid = run_all(grid_specs(settings), settings, log)
    for _ in range(settings.grid_widen):
        extra = widened(grid, choose(grid))
        if not extra:
            break
        log("grid widened past its edge: " + ", ".join(f"{r} lr {v[0]:g}" for r, v in extra.items()))
        grid += run_all(grid_specs(settings, extra), settings, log)
    chosen = {**fixed, **choose(grid)}
    return grid, {recipe: chosen[recipe] for recipe in settings.recipes}


def main_specs(settings: Settings, chosen: dict[str, tuple[float, float]]) -> list[RunSpec]:
    return [RunSpec("main", recipe, recipe, seed, *chosen[recipe], "heldout")
            for seed in settings.seeds for recipe in settings.recipes]


def ablation_specs(settings: Settings, chosen: dict[str, tuple[float, float]]) -> list[RunSpec]:
    if BASE not in chosen:
        return []
    return [RunSpec("ablation", name, BASE, seed, *chosen[BASE], "heldout",
                    tuple(sorted(ablation_settings(name, settings).items())))
            for seed in settings.ablation_seeds or settings.seeds for name in settings.ablations]


def check(settings: Settings) -> None:
    """Every name and size checked before anything trains."""
    unknown = [r for r in settings.recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    for name in settings.ablations:
        ablation_settings(name, settings)
    recipe_grids(settings)
    if settings.split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split_rule {settings.split_rule!r}; choose from {', '.join(SPLIT_RULES)}")
    if not settings.seeds or settings.steps < 1 or settings.eval_every < 1:
        raise ValueError("need at least one seed, steps >= 1 and eval_every >= 1")


def run_benchmark(settings: Settings, log=print) -> dict[str, Any]:
    """SFT start on its split, the start's census of the new split, grid on dev, recipes and ablations on
    held-out; writes results.json, table.md, curves.png, diagnostics.png."""
    check(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    _quiet()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        suite = suite_of(settings)
        sft = train_start(settings, suite, out / "sft", log)
        log("  dev curve (start's side): " + ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["dev_curve"]))
        log("  dev curve (new side): " + ", ".join(f"{p['step']}: {p['overall']:.3f}" for p in sft["new_dev_curve"]))
        census = start_census(settings, suite, out)
        log("  the start's rewrites of the new demonstrations, identical to the real answer: " + ", ".join(
            f"T {t}: {_over(c, 'identical'):.2f}" for t, c in census["census"].items()))
        _check_signal(census, settings)
        start = _start_scores(settings, suite, out / "sft")
        log(f"  held-out score of the start {start['overall']:.3f}")
        grid, chosen = tune(settings, log)
        specs = main_specs(settings, chosen) + ablation_specs(settings, chosen)
        log(f"recipes and ablations on held-out: {len(specs)} runs")
        runs = run_all(specs, settings, log)
    finally:
        torch.set_num_threads(threads)
    result = summarise(settings, sft, start, grid, chosen, runs, census)
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = markdown_table(result)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot_curves(result, out / "curves.png")
    plot_diagnostics(result, out / "diagnostics.png")
    result["table"] = table
    return result


def _check_signal(census: dict[str, Any], settings: Settings) -> None:
    """Nothing long runs when the start reproduces the new demonstrations: SAPO would learn from identical pairs."""
    identical = _over(census["census"][f"{settings.temperature:g}"], "identical")
    if identical > settings.max_start_identical:
        raise RuntimeError(
            f"the start rewrites {identical:.0%} of the new demonstrations into themselves at temperature "
            f"{settings.temperature:g} (max_start_identical {settings.max_start_identical:g}): the recipes would "
            "have little to learn from; train the start less (--sft_steps), use --split_rule harder, or raise "
            "--max_start_identical to run anyway")


def _over(families: dict[str, dict[str, float]], name: str) -> float:
    """Mean of one census statistic over the families, weighted by their counts."""
    total = sum(f["n"] for f in families.values())
    return sum(f[name] * f["n"] for f in families.values()) / max(1, total)


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


def summarise(settings: Settings, sft: dict, start: dict, grid: Sequence[dict], chosen: dict,
              runs: Sequence[dict], census: dict[str, Any]) -> dict[str, Any]:
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
    base = next((label for label, row in summary.items() if row["group"] == "main" and row["name"] == BASE), None)
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
        lines += ["", f"Ablations of {BASE} (its chosen setting; seeds {', '.join(map(str, seeds))}):", "",
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
        lines.append(f"| identical, T {temperature} | {_over(census, 'identical'):.3f} | "
                     + " | ".join(_number(census.get(f, {}).get("identical")) for f in families) + " |")
    base = result["start_census"].get(f"{s['temperature']:g}")
    if base:
        lines.append(f"| judged worse, T {s['temperature']:g} | {_over(base, 'judged_worse'):.3f} | "
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
    mode.add_argument("--quick", action="store_true", help=f"shorter run, about 4 CPU-minutes: {QUICK}")
    mode.add_argument("--full", action="store_true", help="the run docs/results/quality.md reports (the default)")
    defaults = Settings()
    for item in dataclasses.fields(Settings):
        value = getattr(defaults, item.name)
        if isinstance(value, tuple):
            parser.add_argument(f"--{item.name}", nargs="+", type=type(value[0]) if value else str, default=None,
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
        return worker_main(argv[1:])
    settings = settings_from_args(argv)
    result = run_benchmark(settings)
    print("\n" + result["table"])
    print(f"wrote {Path(settings.out) / 'table.md'}, results.json and curves.png; "
          f"wall time {result['seconds']:.0f} s ({result['seconds'] / 60:.1f} min)")
    finals = [r["final"]["overall"] for r in result["runs"]]
    return 0 if all(math.isfinite(v) for v in finals) else 1


if __name__ == "__main__":
    raise SystemExit(main())

