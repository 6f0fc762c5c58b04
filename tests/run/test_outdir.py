"""The output directory: never an input, no stale final beside a new run, and a run killed before its first
checkpoint can be started again (each through `sapo train`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapo import tasks
from sapo.cli import main
from sapo.run.paths import FINAL_RECORD_FILE


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.is_dir() or p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def sapo_script() -> str:
    return str(Path(sys.executable).with_name("sapo"))


@pytest.fixture()
def scene(tmp_path, model_dir):
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(32, 0, seed=2)["train"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)

    def args(out, *extra, model_path=model, data_path=data):
        return ["train", "--model_name_or_path", str(model_path), "--dataset_name", str(data_path), "--output_dir",
                str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--token_generate_length", "4",
                "--max_length", "64", "--max_prompt_length", "48", "--logging_steps", "1", "--use_cpu",
                "--report_to", "none", "--disable_tqdm", "true", *extra]

    return tmp_path, model, data, args


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("sapo: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------
# Item 5: an output directory that is, contains or lies inside an input is refused, whatever the flags
# ------------------------------------------------------------------------------------------------


def test_output_dir_equal_to_the_model_directory_is_refused_and_the_model_is_untouched(scene):
    root, model, _, args = scene
    before = snapshot(root)
    result = subprocess.run([sapo_script(), *args(model, "--overwrite_output_dir", "true")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    error = one_error_line(result.stderr)
    assert f"output_dir {model} is the input of --model_name_or_path" in error
    assert snapshot(root) == before  # nothing written, the model's weights included


def test_output_dir_inside_around_or_linked_to_an_input_is_refused_with_nothing_written(scene, capsys):
    root, model, data, args = scene
    (root / "link_to_model").symlink_to(model, target_is_directory=True)
    cases = [
        (args(root / "link_to_model", "--overwrite_output_dir", "true"), "is the input of --model_name_or_path"),
        (args(model / "run"), "lies inside the input of --model_name_or_path"),
        (args(root, "--overwrite_output_dir", "true"), "contains the input of --model_name_or_path"),
        (args(data.parent, "--overwrite_output_dir", "true"), "contains the input of --dataset_name"),
        (args(data.parent / "run", data_path=data.parent), "lies inside the input of --dataset_name"),
    ]
    for argv, expected in cases:
        before = snapshot(root)
        assert main(argv) == 2
        error = one_error_line(capsys.readouterr().err)
        assert expected in error and "choose an --output_dir outside it" in error, error
        assert snapshot(root) == before


# ------------------------------------------------------------------------------------------------
# Item 6: an overwriting run killed before its final save leaves no final outputs of the old run
# ------------------------------------------------------------------------------------------------


def test_an_overwriting_run_killed_early_leaves_no_final_of_the_old_run(scene):
    root, _, _, args = scene
    out = root / "run"
    assert main(args(out, "--save_strategy", "no")) == 0
    assert (out / FINAL_RECORD_FILE).exists() and (out / "ema" / "model.safetensors").exists()
    victim = subprocess.Popen([sapo_script(), *args(out, "--overwrite_output_dir", "true", "--max_steps", "500",
                                                    "--save_steps", "1")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoint-1", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (out / FINAL_RECORD_FILE).exists()
    assert not (out / "model.safetensors").exists() and not (out / "ema").exists()
    assert not (out / "README.md").exists()
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps == sorted(steps) and steps[0] == 1  # only the new run's rows


# ------------------------------------------------------------------------------------------------
# Item 10: a run killed before its first checkpoint is started again by a plain rerun
# ------------------------------------------------------------------------------------------------


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_the_same_command(scene, capsys):
    root, _, _, args = scene
    out = root / "run"
    victim = subprocess.Popen([sapo_script(), *args(out, "--max_steps", "500", "--save_steps", "1000")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for(out / "metrics.jsonl", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not list(out.glob("checkpoint-*"))
    assert main(args(out, "--resume_from_checkpoint", "true")) == 2
    error = one_error_line(capsys.readouterr().err)
    assert "has no checkpoint" in error and "run the same command without --resume_from_checkpoint" in error, error
    assert main(args(out)) == 0  # what the message says works
    assert json.loads((out / FINAL_RECORD_FILE).read_text())["step"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]  # the killed run's rows are gone


def test_a_directory_with_results_but_no_checkpoint_points_to_overwrite(scene, capsys):
    root, _, _, args = scene
    out = root / "run"
    assert main(args(out, "--save_strategy", "no")) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert main(args(out, "--resume_from_checkpoint", "true")) == 2
    assert "run the same command with --overwrite_output_dir true" in one_error_line(capsys.readouterr().err)
    assert main(args(out)) == 2
    error = one_error_line(capsys.readouterr().err)
    assert "--overwrite_output_dir true" in error and "--resume_from_checkpoint" not in error, error
    assert snapshot(out) == before


def test_an_output_dir_deleted_mid_run_stops_the_run_in_one_paragraph(scene):
    root, _, _, args = scene
    out = root / "run"
    process = subprocess.Popen([sapo_script(), *args(out, "--max_steps", "200", "--save_steps", "1")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoint-2", process)
    shutil.rmtree(out, ignore_errors=True)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2
    error = one_error_line(stderr)
    assert f"output_dir {out}: its lock file .sapo.lock is gone" in error, error
    assert not (out / "sapo_final.json").exists()
