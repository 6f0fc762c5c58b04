"""Checkpoints resume exactly; kills, signals, interrupted saves and non-finite steps lose nothing."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import helpers
import pytest
import torch
from helpers import clones
from safetensors.torch import load_file
from transformers import TrainerCallback

from sapo import SAPOTrainer, tasks
from sapo.cli import main
from sapo.errors import CheckpointError, OutputDirError, TrainingStopped
from sapo.metrics import read_metrics

RESUME_RUN = dict(max_steps=6, save_strategy="steps", save_steps=3, ref_update_mode="ema", ref_update_steps=2)


def config(out, **overrides):
    return helpers.config(out, **{**RESUME_RUN, **overrides})


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


def test_overwriting_removes_the_previous_runs_checkpoints(tmp_path, tokenizer, suite):
    """Otherwise rotation (which keeps the highest steps) would delete the new run's checkpoints and keep old ones."""
    run = tmp_path / "run"
    trainer_for(run, tokenizer, suite, max_steps=4, save_steps=2).train()
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    (run / "checkpoint-7").mkdir()  # not a sapo checkpoint (no sapo_state/): left alone
    trainer_for(run, tokenizer, suite, max_steps=1, save_steps=1, overwrite_output_dir=True).train()
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-7"}


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


@pytest.mark.parametrize("sigint", ["inherited", "ignored"])
def test_a_second_sigint_kills_at_once_without_a_traceback(tmp_path, cli_setup, sigint):
    """Also where the run inherits an ignored SIGINT, as a command started with `&` by a script (a CI runner) does:
    the first SIGINT still stops it, and the second kills (it was ignored there: exit 130 in fresh-clone CI)."""
    command = [str(Path(sys.executable).with_name("sapo")), *cli_setup(tmp_path / "run", "--max_steps", "500",
                                                                      "--save_steps", "1000")[3:]]
    if sigint == "ignored":  # `trap '' INT` ignores it, and exec keeps an ignored disposition
        command = ["/bin/sh", "-c", "trap '' INT; exec \"$@\"", "sh", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "run" / "metrics.jsonl", process)
    process.send_signal(signal.SIGINT)
    # the second only once the first is handled: two signals that arrive before Python runs its handler are one
    before = []
    while not any("SIGINT received" in line for line in before):
        line = process.stderr.readline()
        assert line, "".join(before)[-3000:]
        before.append(line)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGINT and time.monotonic() - sent < 2.0
    stderr = "".join(before) + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_counters_and_metrics_since_the_last_log_survive_a_resume(tmp_path, tokenizer, suite):
    """A checkpoint between two logging steps: the resumed run logs the same rows, non-finite counter included."""
    full = trainer_for(tmp_path / "full", tokenizer, suite, logging_steps=2, save_steps=3)
    poison_steps(full, {2})
    full.train()
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    resumed = trainer_for(tmp_path / "resumed", tokenizer, suite, logging_steps=2, save_steps=3)
    poison_steps(resumed, {2})
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.nonfinite_steps == 1

    def rows(out):
        return [(r["step"], r["loss"], r["rewards/margins"], r["nonfinite/skipped_steps"])
                for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]

    assert [r[0] for r in rows(tmp_path / "full")] == [2, 4, 6]
    assert rows(tmp_path / "resumed") == rows(tmp_path / "full")


# ------------------------------------------------------------------------------------------------
# Through the CLI: nothing lost, nothing cryptic
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory, model_dir):
    """A 4-step `sapo train` (checkpoints at 2 and 4, constant learning rate, so one step more would show) and
    its finished output directory, `reference`."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data.jsonl"
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(64, 0, seed=2)["train"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def args(out, *extra):
        return ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                str(out), "--max_steps", "4", "--save_steps", "2", "--seed", "7", "--per_device_train_batch_size", "4",
                "--token_generate_length", "4", "--max_length", "64", "--max_prompt_length", "48",
                "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--use_cpu",
                "--report_to", "none", "--disable_tqdm", "true", "--ref_update_steps", "3", *extra]

    reference = root / "reference"
    assert main(args(reference)) == 0
    return SimpleNamespace(root=root, data=data, args=args, reference=reference)


def copy_of_reference(cli, tmp_path):
    shutil.copytree(cli.reference, tmp_path / "run")
    return tmp_path / "run"


def assert_final_outputs_match_reference(out, cli):
    for name in ("model.safetensors", "ema/model.safetensors"):
        ours, theirs = load_file(str(out / name)), load_file(str(cli.reference / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert json.loads((out / "sapo_final.json").read_text())["step"] == 4
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()
    assert not (out / ".sapo.lock").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def files_of(out):
    """Every file and directory with its size and modification time: "nothing written" compares two of these."""
    return {str(p.relative_to(out)): (p.is_dir() or p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")}


def run_refused(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sapo: error: ")]
    assert len(errors) == 1
    return errors[0]


def test_resuming_a_finished_run_trains_nothing_and_completes_the_final_outputs(cli, tmp_path):
    run = copy_of_reference(cli, tmp_path)
    assert main(cli.args(run, "--resume_from_checkpoint", "true")) == 0  # the 13th-step bug: no checkpoint-5
    assert_final_outputs_match_reference(run, cli)
    assert (run / "metrics.jsonl").read_text() == (cli.reference / "metrics.jsonl").read_text()
    for name in ("model.safetensors", "ema", "README.md", "sapo_final.json"):  # died before its final save
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    assert main(cli.args(run, "--resume_from_checkpoint", str(run / "checkpoint-4"))) == 0
    assert_final_outputs_match_reference(run, cli)


@pytest.mark.parametrize("when", ["last step", "final save"])
def test_a_signal_at_the_end_completes_the_run(cli, tmp_path, capsys, monkeypatch, when):
    after_step, write_card = SAPOTrainer._after_optimizer_step, SAPOTrainer.write_model_card

    def signal_during_last_step(self):
        after_step(self)
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    def signal_during_final_save(self, directory):
        os.kill(os.getpid(), signal.SIGTERM)
        write_card(self, directory)

    if when == "last step":
        monkeypatch.setattr(SAPOTrainer, "_after_optimizer_step", signal_during_last_step)
    else:
        monkeypatch.setattr(SAPOTrainer, "write_model_card", signal_during_final_save)
    assert main(cli.args(tmp_path / "run")) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SIGTERM received at the end of training" in err and "nothing to resume" in err
    assert_final_outputs_match_reference(tmp_path / "run", cli)


KILL_HALF_WAY_THROUGH_THE_FINAL_MOVES = """
import os, signal, sys
from pathlib import Path
import sapo.run.publish

move_into_place = sapo.run.publish._move_final_into_place

def die_half_way(out):
    committed = Path(out) / ".staging" / "final"
    if not committed.is_dir():  # the check at the start of the run
        return move_into_place(out)
    first = sorted(p for p in committed.iterdir() if p.name != "sapo_final.json")[0]
    os.replace(first, Path(out) / first.name)
    os.kill(os.getpid(), signal.SIGKILL)

sapo.run.publish._move_final_into_place = die_half_way
from sapo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_the_final_save_then_resume_takes_the_stale_lock_and_completes(cli, tmp_path, caplog):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_HALF_WAY_THROUGH_THE_FINAL_MOVES)
    run = tmp_path / "run"
    victim = subprocess.run([sys.executable, str(driver), *cli.args(run)], capture_output=True, text=True,
                            timeout=300)
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-3000:]
    assert json.loads((run / ".sapo.lock").read_text())["pid"] > 0  # left behind by the killed run
    assert not (run / "sapo_final.json").exists() and (run / ".staging" / "final").is_dir()
    with caplog.at_level(logging.WARNING):
        assert main(cli.args(run, "--resume_from_checkpoint", "true")) == 0
    assert "taking over the lock of a run that is no longer running" in caplog.text
    assert_final_outputs_match_reference(run, cli)
    assert loss_rows(run) == loss_rows(cli.reference)


def test_a_changed_setting_is_refused_by_name_and_accepted_when_allowed(cli, tmp_path, capsys):
    run = copy_of_reference(cli, tmp_path)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                                  for r in tasks.make_suite(64, 0, seed=3)["train"]))
    before = files_of(run)
    for extra, expected in [
        (["--loss_type", "ipo", "--seed", "8"], ['loss_type (checkpoint "sigmoid", this run "ipo")',
                                                 "seed (checkpoint 7, this run 8)",
                                                 "--resume_allow_changes loss_type seed"]),
        (["--recipe", "sft"], ['recipe (checkpoint "sapo", this run "sft")']),
        (["--dataset_name", str(other_data)], ["data (the tokenized training data is not the same)"]),
        (["--ema_beta", "0.9"], ["ema_beta (checkpoint 0.5, this run 0.9)"]),
    ]:
        error = run_refused(capsys, cli.args(run, "--resume_from_checkpoint", "true", *extra))
        assert "settings differ" in error and all(part in error for part in expected), error
        assert files_of(run) == before
    assert main(cli.args(run, "--resume_from_checkpoint", str(run / "checkpoint-2"), "--ema_beta", "0.9",
                         "--resume_allow_changes", "ema_beta")) == 0
    resumed_ema = load_file(str(run / "ema" / "model.safetensors"))
    reference_ema = load_file(str(cli.reference / "ema" / "model.safetensors"))
    assert not all(torch.equal(resumed_ema[k], reference_ema[k]) for k in reference_ema)  # the change took effect
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_resume_from_other_start_weights_of_the_same_shapes_is_refused(cli, tmp_path, model_dir, capsys):
    """The reference of a fixed-reference run is rebuilt from --model_name_or_path on resume: another model of the
    same shapes would silently train against another reference."""
    from sapo.tiny import build_model, build_tokenizer, save_pair

    tokenizer = build_tokenizer()
    other = tmp_path / "other_model"
    save_pair(build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1), tokenizer, other)
    run = copy_of_reference(cli, tmp_path)
    before = files_of(run)
    argv = [*cli.args(run, "--resume_from_checkpoint", str(run / "checkpoint-2"))]
    argv[argv.index("--model_name_or_path") + 1] = str(other)
    error = run_refused(capsys, argv)
    assert "start_weights (the weights this run starts from are not those the checkpoint's run started" in error
    assert "--resume_allow_changes start_weights" in error, error
    assert files_of(run) == before
    moved = tmp_path / "same_model_elsewhere"  # the same bytes under another path are the same start
    shutil.copytree(model_dir, moved)
    argv[argv.index("--model_name_or_path") + 1] = str(moved)
    assert main(argv) == 0
    assert_final_outputs_match_reference(run, cli)


def test_damaged_checkpoints_are_refused_with_nothing_written(cli, tmp_path, capsys):
    run = copy_of_reference(cli, tmp_path)
    checkpoint = run / "checkpoint-4"

    def truncate(path):
        path.write_bytes(path.read_bytes()[:100])

    def garble(path):
        path.write_text(path.read_text().replace("[", "{", 1))

    for relative, damage, resume, expected in [
        ("model.safetensors", truncate, "true", "model.safetensors has 100 bytes"),
        ("sapo_state/parameters.json", garble, str(checkpoint), "sapo_state/parameters.json differs"),
        ("optimizer.pt", Path.unlink, "true", "optimizer.pt is missing"),
        ("sapo_state/trainer.json", Path.unlink, str(checkpoint), "missing sapo_state/trainer.json"),
    ]:
        original = (checkpoint / relative).read_bytes()
        damage(checkpoint / relative)
        before = files_of(run)
        error = run_refused(capsys, cli.args(run, "--resume_from_checkpoint", resume))
        assert expected in error and "--resume_from_checkpoint" in error and "checkpoint-2" in error, error
        assert files_of(run) == before  # nothing written: no lock left, metrics untouched
        (checkpoint / relative).write_bytes(original)


@pytest.mark.parametrize("damage", ["deleted", "torn"])
def test_metrics_rows_lost_before_a_resume_are_restored_from_the_checkpoint(cli, tmp_path, damage):
    run = copy_of_reference(cli, tmp_path)
    shutil.rmtree(run / "checkpoint-4")
    for name in ("model.safetensors", "ema", "README.md", "sapo_final.json"):  # as if killed after checkpoint-2
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    metrics = run / "metrics.jsonl"
    if damage == "deleted":
        metrics.unlink()
    else:  # cut in the middle of the first row: every row after it is gone too
        metrics.write_bytes(metrics.read_bytes()[:40])
    assert main(cli.args(run, "--resume_from_checkpoint", "true")) == 0
    def step_rows(out):  # every row but the end-of-training summary (timings, and a mean over this process's steps)
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "generation/"))}
                for row in read_metrics(out / "metrics.jsonl") if "train_runtime" not in row]

    assert step_rows(run) == step_rows(cli.reference) and [r["step"] for r in step_rows(run)] == [1, 2, 3, 4]


def test_a_checkpoint_whose_step_disagrees_with_its_name_is_refused(cli, tmp_path, capsys):
    run = copy_of_reference(cli, tmp_path)
    shutil.rmtree(run / "checkpoint-4")
    os.rename(run / "checkpoint-2", run / "checkpoint-3")  # every file still matches its checksum
    before = files_of(run)
    error = run_refused(capsys, cli.args(run, "--resume_from_checkpoint", "true"))
    assert "its step is not one step" in error and "trainer_state.json (global_step) says 2" in error, error
    assert "its name says 3" in error
    assert files_of(run) == before


def test_full_disk_during_a_metrics_append_then_resume(cli, tmp_path, capsys, monkeypatch):
    """The append is cut short (a torn line) and the run ends in one paragraph; resume and overwrite cope."""
    log = SAPOTrainer.log

    def disk_full_at_step_3(self, logs, start_time=None):
        if self.state.global_step == 3 and "loss" in logs:
            path = os.path.join(self.args.output_dir, "metrics.jsonl")
            with open(path, "a") as handle:
                handle.write('{"step": 3, "loss": 0.6')
            raise OSError(errno.ENOSPC, "No space left on device", path)
        log(self, logs, start_time)

    monkeypatch.setattr(SAPOTrainer, "log", disk_full_at_step_3)
    run = tmp_path / "run"
    error = run_refused(capsys, cli.args(run))
    assert "no space left on the device of output_dir" in error and "--resume_from_checkpoint true" in error
    assert not (run / ".sapo.lock").exists() and (run / "checkpoint-2").is_dir()
    monkeypatch.undo()
    assert main(cli.args(run, "--resume_from_checkpoint", "true")) == 0
    assert loss_rows(run) == loss_rows(cli.reference)
    assert_final_outputs_match_reference(run, cli)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')
    assert main(cli.args(run, "--overwrite_output_dir", "true")) == 0
    assert loss_rows(run) == loss_rows(cli.reference)


def test_two_runs_started_together_into_one_directory_one_is_refused(cli, tmp_path):
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "sapo.cli", *cli.args(out, "--max_steps", "6")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    codes = [p.returncode for p in processes]
    assert sorted(codes) == [0, 2], [o[1][-2000:] for o in outputs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert f"in use by another sapo run (pid {processes[winner].pid} on host" in outputs[loser][1]
    assert "Traceback" not in outputs[loser][1]
    assert [row[0] for row in loss_rows(out)] == [1, 2, 3, 4, 5, 6]  # one writer: one row per step
    assert not (out / ".sapo.lock").exists()
