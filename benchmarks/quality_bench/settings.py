"""What a benchmark run is made of: the recipes, the settings (the --full defaults and the --quick preset),
the ablations, one run's spec, and the keys that decide whether a cached output is still valid (they must stay
byte-identical across refactors, or every cached run retrains)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

RECIPES: tuple[str, ...] = ("sft", "dpo", "orpo", "spin", "sapo-dpo", "sapo-orpo", "sapo-rpo")
SAPO_RECIPES = ("sapo-dpo", "sapo-orpo", "sapo-rpo")
RECIPE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"sapo-rpo": ("sapo-dpo", {"nll_weight": 1.0})}
"""Benchmark recipes that are a sapo recipe with settings: ``sapo-rpo`` is SAPO-DPO plus the real answers' NLL at
weight 1 (RPO's recommended alpha), to test whether the reference-based recipes lack the likelihood term."""
BASE = "sapo-dpo"  # the recipe the ablations start from
START = "sft checkpoint (start)"
SUITE_SEED = 0
SPLIT_RULES = ("harder", "same")


@dataclass
class Settings:
    """Defaults are the --full run; QUICK overrides some of them."""

    out: str = "runs/quality"
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0, 1)  # () = the same seeds as the recipes (3 seeds: about 12 min more)
    recipes: tuple[str, ...] = RECIPES
    ablations: tuple[str, ...] = ("keep", "keep-skip", "no-skip", "whole", "no-ema", "T0.3", "T1", "judge")
    ablation_base: str = BASE  # the SAPO recipe the ablations change one part of (at its chosen setting)
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


SUITE_KEYS = ("families", "split_rule", "n_start", "n_train", "n_dev", "n_heldout")


SFT_KEYS = ("families", "split_rule", "n_start", "n_dev", "hidden_size", "num_layers", "sft_steps",
            "sft_batch_size", "sft_learning_rate", "sft_eval_every", "max_length", "max_prompt_length",
            "max_new_tokens")
CENSUS_KEYS = ("n_train", "diagnostic_per_family", "census_temperatures", "temperature", "token_generate_length")


def key_of(settings: Settings, names: Sequence[str]) -> dict[str, Any]:
    """The named settings as they read back from JSON (tuples become lists), so that a saved key compares equal."""
    return json.loads(json.dumps({name: getattr(settings, name) for name in names}))


RUN_KEYS = ("split_rule", "n_train", "steps", "batch_size", "warmup_steps", "lr_scheduler", "token_generate_length",
            "temperature", "ref_update_steps", "spin_iterations", "eval_every", "diagnostic_per_family",
            "n_heldout")


def run_key(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    return json.loads(json.dumps({"spec": dataclasses.asdict(spec), "sft": key_of(settings, SFT_KEYS),
                                  "run": key_of(settings, RUN_KEYS)}))
