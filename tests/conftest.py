"""Shared fixtures: a tiny offline tokenizer/model and a small demonstration set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

from sapo import tasks, tiny


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    return tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)


@pytest.fixture(scope="session")
def suite():
    return tasks.make_suite(96, 16, seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model + tokenizer directory, loaded by path like a user's SFT checkpoint."""
    directory = tmp_path_factory.mktemp("tiny_model")
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), tokenizer,
                   directory)
    return directory


def clones(tensors):
    return [t.detach().clone() for t in tensors]


@pytest.fixture()
def snapshot_each_step():
    """`snapshot_each_step(trainer, take)` -> dict filled with `take()` right after SAPO's once-per-optimizer-step
    work (EMA update, reference refresh) of every step, keyed by global step."""

    def install(trainer, take):
        snapshots = {}

        class Snapshot(TrainerCallback):  # added after SAPO's own step hooks, so it runs after them
            def on_step_end(self, args, state, control, **kwargs):
                snapshots[state.global_step] = take()

        trainer.add_callback(Snapshot())
        return snapshots

    return install


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
