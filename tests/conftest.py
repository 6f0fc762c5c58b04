"""Shared fixtures: a tiny offline tokenizer/model and a small demonstration set."""

from __future__ import annotations

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
