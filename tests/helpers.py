"""Helpers shared by the tests (fixtures stay in conftest.py): one small-run config, samplers that script what the
EMA model writes, and loaders for the benchmark scripts. Tests import from here, never from another test module."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from sapo import SAPOConfig

SMALL_RUN = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, token_generate_length=4, max_length=64,
                 max_prompt_length=48, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                 disable_tqdm=True, seed=0)
"""A tiny run on CPU: 4 steps of 4 examples, short sequences, no checkpoints, no reporting, seed 0."""


def config(out: str | Path, **overrides) -> SAPOConfig:
    """A SAPOConfig for a small CPU run writing to `out`; `overrides` replace any of `SMALL_RUN`."""
    return SAPOConfig(output_dir=str(out), **{**SMALL_RUN, **overrides})


def loss_rows(run_dir: Path) -> list[dict]:
    """The training rows (those with a loss) of a run directory's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def clones(tensors):
    return [t.detach().clone() for t in tensors]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks are scripts, not part of the package); yields it, then
    forgets it."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sapo_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


class CopyingSampler:
    """A generator that reproduces its demonstrations: each context prompt + y[:k] is continued with y itself, except
    for the examples in `differ` (dataset indices) and in every call from the `differ_from_call`-th on, whose
    continuation is each token shifted (a real rewrite)."""

    def __init__(self, differ=(), differ_from_call=None):
        self.differ, self.differ_from_call, self.calls, self.sequences = set(differ), differ_from_call, 0, []

    def attach(self, trainer):
        self.sequences = [e.prompt_ids + e.response_ids for e in trainer.train_dataset.examples]
        return trainer

    def sample(self, model, contexts, max_new_tokens):
        samples, self.calls = [], self.calls + 1
        changed = self.differ_from_call is not None and self.calls > self.differ_from_call
        for context in contexts:
            index = next(i for i, s in enumerate(self.sequences) if s[:len(context)] == list(context))
            copy = self.sequences[index][len(context):len(context) + max_new_tokens]
            samples.append([(t % 50) + 1 for t in copy] if changed or index in self.differ else copy)
        return samples


class ScriptedSampler:
    """Returns fixed continuations and records what it was asked."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, []

    def sample(self, model, contexts, max_new_tokens):
        self.calls.append(([list(c) for c in contexts], max_new_tokens))
        return [list(self.outputs[i % len(self.outputs)]) for i in range(len(contexts))]


TINY_TRAIN_FLAGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                    "--token_generate_length", "4", "--max_length", "64", "--max_prompt_length", "48",
                    "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--logging_steps", "1",
                    "--save_strategy", "no", "--disable_tqdm", "true"]
"""`sapo train` flags that shrink any documented run (flags override its --config file) to 2 CPU steps."""


def write_preference_records(path: Path, n: int = 16, seed: int = 2) -> Path:
    """`n` built-in task demonstrations as chat preference records (chosen/rejected), a format every recipe
    reads (SAPO ignores the rejected side), written to the JSONL file `path`."""
    from sapo import tasks

    rows = []
    for record in tasks.make_suite(n, 0, seed=seed)["train"]:
        user, answer = record["messages"][0], record["messages"][1]
        wrong = {"role": "assistant", "content": record["rejected"]}
        rows.append({"chosen": [user, answer], "rejected": [user, wrong]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
