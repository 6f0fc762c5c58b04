"""Checkpoints resume exactly; kills, signals, interrupted saves and non-finite steps lose nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import clones
from safetensors.torch import load_file
from transformers import TrainerCallback

from sapo import SAPOConfig, SAPOTrainer, tasks
from sapo.errors import CheckpointError, OutputDirError, TrainingStopped


def config(out, **overrides):
    settings = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                    token_generate_length=4, max_length=64, max_prompt_length=48, logging_steps=1, report_to="none",
                    save_strategy="steps", save_steps=3, use_cpu=True, disable_tqdm=True, ref_update_mode="ema",
                    ref_update_steps=2, seed=0)
    settings.update(overrides)
    return SAPOConfig(**settings)


def trainer_for(out, tokenizer, suite, **overrides):
    from sapo.tiny import build_model

    model = build_model(tokenizer, hidden_size=32, seed=0)
    return SAPOTrainer(model=model, args=config(out, **overrides), train_dataset=suite["train"],
                       processing_class=tokenizer)


def loss_rows(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["rewards/margins"]) for r in rows if "loss" in r]


def test_resume_is_bit_identical(tmp_path, tokenizer, suite):
    full = trainer_for(tmp_path / "full", tokenizer, suite)
    full.train()
    resumed = trainer_for(tmp_path / "full", tokenizer, suite)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for name, param in full.policy.named_parameters():
        assert torch.equal(param, dict(resumed.policy.named_parameters())[name]), name
    for a, b in zip(full.copies.ema.tensors + full.copies.reference.tensors,
                    resumed.copies.ema.tensors + resumed.copies.reference.tensors, strict=True):
        assert torch.equal(a, b)
    assert [(e.rejected, e.times_sampled) for e in full.recipe.buffer.entries()] == [
        (e.rejected, e.times_sampled) for e in resumed.recipe.buffer.entries()]
    assert resumed.state.global_step == 6


class StopAfter(TrainerCallback):
    """Ends training after `step` without saving: the process "dies" with rows logged past its checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_true_takes_latest_and_metrics_are_not_duplicated(tmp_path, tokenizer, suite):
    trainer_for(tmp_path / "a", tokenizer, suite).train()
    reference = loss_rows(tmp_path / "a")
    interrupted = trainer_for(tmp_path / "b", tokenizer, suite, save_steps=2)
    interrupted.add_callback(StopAfter(5))
    interrupted.train()
    rows_b = loss_rows(tmp_path / "b")
    assert [r[0] for r in rows_b] == [1, 2, 3, 4, 5]
    trainer_for(tmp_path / "b", tokenizer, suite, save_steps=2).train(resume_from_checkpoint="true")
    assert [r[0] for r in loss_rows(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert loss_rows(tmp_path / "b")[:4] == rows_b[:4]  # row 5 of the dead run was dropped and redone
    assert loss_rows(tmp_path / "b") == reference  # same losses as the uninterrupted run


def test_checkpoint_holds_every_piece_of_state(tmp_path, tokenizer, suite):
    trainer = trainer_for(tmp_path / "run", tokenizer, suite, max_steps=3)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    names = {p.name for p in checkpoint.iterdir()} | {p.name for p in (checkpoint / "sapo_state").iterdir()}
    for expected in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                     "ema.safetensors", "reference.safetensors", "replay_buffer_rank0.safetensors",
                     "segment_rng_rank0.json"):
        assert expected in names
    ema = load_file(str(checkpoint / "sapo_state" / "ema.safetensors"))
    for name, tensor in zip(trainer.copies.ema.names, trainer.copies.ema.tensors, strict=True):
        assert torch.equal(ema[name], tensor)
    assert not (tmp_path / "run" / ".staging" / "checkpoint-3").exists()


def test_save_total_limit_keeps_newest(tmp_path, tokenizer, suite):
    trainer_for(tmp_path / "run", tokenizer, suite, save_steps=1, save_total_limit=2).train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_save_interrupted_half_way_leaves_previous_checkpoint(tmp_path, tokenizer, suite, monkeypatch):
    trainer = trainer_for(tmp_path / "run", tokenizer, suite, save_steps=3, save_total_limit=1)
    original = trainer.save_sapo_state

    def crash_on_second(directory):
        if "checkpoint-6" in str(directory):
            raise OSError("disk full (simulated)")
        original(directory)

    monkeypatch.setattr(trainer, "save_sapo_state", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    trainer.validate_checkpoint(tmp_path / "run" / "checkpoint-3")
    resumed = trainer_for(tmp_path / "run", tokenizer, suite)
    resumed.train(resume_from_checkpoint="true")
    assert resumed.state.global_step == 6


def test_checkpoint_from_another_model_is_refused_before_training(tmp_path, tokenizer, suite):
    trainer_for(tmp_path / "run", tokenizer, suite, max_steps=3).train()
    from sapo.tiny import build_model

    other = SAPOTrainer(model=build_model(tokenizer, hidden_size=48), args=config(tmp_path / "other"),
                        train_dataset=suite["train"], processing_class=tokenizer)
    with pytest.raises(CheckpointError, match="written by another run: parameter"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert not (tmp_path / "other").exists()


def test_non_empty_output_dir_is_protected(tmp_path, tokenizer, suite):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not empty"):
        trainer_for(tmp_path / "run", tokenizer, suite).train()
    trainer_for(tmp_path / "run", tokenizer, suite, max_steps=1, overwrite_output_dir=True).train()
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def poison_steps(trainer, steps):
    """Make the loss NaN on the given (1-based) optimizer steps."""
    compute = trainer.compute_loss

    def compute_loss(model, inputs, **kwargs):
        loss = compute(model, inputs, **kwargs)
        return loss * float("nan") if trainer.state.global_step + 1 in steps else loss

    trainer.compute_loss = compute_loss


def test_non_finite_step_is_skipped_and_counted(tmp_path, tokenizer, suite, snapshot_each_step):
    trainer = trainer_for(tmp_path / "run", tokenizer, suite, max_steps=4, save_strategy="no")
    poison_steps(trainer, {2})
    seen = snapshot_each_step(trainer, lambda: (clones(trainer.copies.params), clones(trainer.copies.ema.tensors)))
    trainer.train()
    for before, after in zip(seen[1], seen[2], strict=True):  # policy and EMA unchanged by the poisoned step
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2][0], seen[3][0], strict=True))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite/skipped_steps"] for r in rows if "loss" in r] == [0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.copies.params)


def test_repeated_non_finite_steps_stop_with_checkpoint(tmp_path, tokenizer, suite):
    trainer = trainer_for(tmp_path / "run", tokenizer, suite, max_steps=10, save_steps=100, max_nonfinite_steps=2)
    poison_steps(trainer, {3, 4, 5})
    with pytest.raises(TrainingStopped, match="2 optimizer steps in a row") as stopped:
        trainer.train()
    assert stopped.value.exit_code == 3
    assert stopped.value.checkpoint.endswith("checkpoint-4")
    trainer.validate_checkpoint(Path(stopped.value.checkpoint))


# ------------------------------------------------------------------------------------------------
# Real processes: SIGKILL and SIGTERM
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def cli_setup(tmp_path, model_dir):
    data = tmp_path / "data.jsonl"
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(64, 0, seed=2)["train"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def command(out, *extra):
        return [sys.executable, "-m", "sapo.cli", "train", "--model_name_or_path", str(model_dir),
                "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "8", "--save_steps", "2",
                "--per_device_train_batch_size", "4", "--token_generate_length", "4", "--max_length", "64",
                "--max_prompt_length", "48", "--learning_rate", "1e-3", "--logging_steps", "1", "--use_cpu",
                "--report_to", "none", "--disable_tqdm", "true", "--ref_update_steps", "3", *extra]

    return command


def wait_for(path, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path, cli_setup):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cli_setup(tmp_path / "full"), check=True, capture_output=True, env=env, timeout=300)
    victim = subprocess.Popen(cli_setup(tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    wait_for(tmp_path / "killed" / "checkpoint-4", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (tmp_path / "killed" / "model.safetensors").exists()  # it really died before the end
    resumed = subprocess.run(cli_setup(tmp_path / "killed", "--resume_from_checkpoint", "true"),
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model.safetensors", "ema/model.safetensors"):
        full, killed = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "killed" / name))
        assert full.keys() == killed.keys()
        assert all(torch.equal(full[k], killed[k]) for k in full), name
    assert loss_rows(tmp_path / "killed") == loss_rows(tmp_path / "full")


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path, cli_setup):
    process = subprocess.Popen(cli_setup(tmp_path / "run", "--max_steps", "500", "--save_steps", "1000"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "run" / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in stderr
    assert "SIGTERM received" in stderr and "resume with --resume_from_checkpoint" in stderr
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    assert 1 <= step < 500 and checkpoints[0].name == f"checkpoint-{step}"
