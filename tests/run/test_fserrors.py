"""A full disk is recognised whatever library met it (the real-disk runs are in tests/test_run_dir.py)."""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from sapo import tasks
from sapo.errors import OutputDirError
from sapo.metrics import read_metrics
from sapo.run.fserrors import disk_full_error, filesystem_error, is_disk_full
from sapo.run.publish import checksum_problems


def test_disk_full_becomes_a_one_paragraph_error(tmp_path):
    error = disk_full_error(OSError(errno.ENOSPC, "No space left on device", "x/metrics.jsonl"), tmp_path)
    assert isinstance(error, OutputDirError) and "no space left" in str(error) and "metrics.jsonl" in str(error)
    assert disk_full_error(OSError(errno.EACCES, "denied"), tmp_path) is None


def test_errors_that_are_not_oserrors_are_recognised_by_what_they_are(tmp_path):
    safetensors_full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert is_disk_full(safetensors_full, tmp_path)[0]
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as chained:
        assert is_disk_full(chained, tmp_path)[0]
    assert not is_disk_full(RuntimeError("CUDA out of memory"), tmp_path)[0]
    assert not is_disk_full(SafetensorError("invalid header"), tmp_path)[0]


def test_a_refused_write_is_named_whatever_raised_it(tmp_path):
    assert "read-only" in str(filesystem_error(OSError(errno.EROFS, "Read-only file system", "x"), tmp_path))
    safetensors_ro = SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert "its file system is read-only" in str(filesystem_error(safetensors_ro, tmp_path))
    torch_open = RuntimeError(f"File {tmp_path}/run/.staging/x/optimizer.pt cannot be opened.")
    assert filesystem_error(torch_open, tmp_path) is None  # this directory is writable: something else
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: nothing to show there
            return
        assert "permission denied" in str(filesystem_error(torch_open, locked / "run"))
    finally:
        locked.chmod(0o700)


def test_a_torch_stream_write_failure_counts_only_on_a_nearly_full_file_system(tmp_path):
    torch_short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 217472 vs 217360")
    assert not is_disk_full(torch_short_write, tmp_path)[0]  # this test's disk has room: another cause


# ------------------------------------------------------------------------------------------------
# A real small file system: `sapo train` (the console script) fills it during a checkpoint or the final save
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(directory: Path, size: str):
    """A tmpfs of `size` mounted at `directory` (root only); skips the test, saying why, where mounting is refused."""
    directory.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) to make a real small file system (tmpfs)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture(scope="module")
def run_command(tmp_path_factory, model_dir):
    data = tmp_path_factory.mktemp("disk_data") / "data.jsonl"
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(32, 0, seed=2)["train"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sapo = Path(sys.executable).with_name("sapo")

    def command(out, *extra, steps=12):
        return [str(sapo), "train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
                "--output_dir", str(out), "--max_steps", str(steps), "--save_steps", "1",
                "--per_device_train_batch_size", "4", "--token_generate_length", "4", "--max_length", "64",
                "--max_prompt_length", "48",
                "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", *extra]

    return command


def fill_then_check(run_command, root: Path, size: str) -> Path:
    """Train into a tmpfs of `size` until it is full: one paragraph, exit 2, and every published checkpoint whole."""
    with small_disk(root / "disk", size) as disk:
        out = disk / "run"
        result = subprocess.run(run_command(out), capture_output=True, text=True, timeout=600)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("sapo: error: ")]
        assert len(errors) == 1 and "no space left on the device of output_dir" in errors[0], result.stderr[-2000:]
        checkpoints = sorted(out.glob("checkpoint-*"))
        assert checkpoints, "the disk filled before the first checkpoint: make it larger"
        for checkpoint in checkpoints:
            assert checkpoint_problems(checkpoint) == [], checkpoint
        assert not (out / "sapo_final.json").exists() and not (out / ".sapo.lock").exists()
        assert not list(out.glob(".staging/*"))  # the checkpoint cut short was dropped, freeing its space
        return out


def test_a_full_disk_during_a_checkpoint_is_one_paragraph_and_the_run_resumes_once_space_is_freed(run_command,
                                                                                                   tmp_path):
    with small_disk(tmp_path / "disk", "2m") as disk:
        out = disk / "run"
        result = subprocess.run(run_command(out, steps=5), capture_output=True, text=True, timeout=600)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "sapo: error: no space left on the device" in result.stderr
        assert all(checkpoint_problems(p) == [] for p in out.glob("checkpoint-*"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        resumed = subprocess.run(run_command(out, "--resume_from_checkpoint", "true", steps=5), capture_output=True,
                                 text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert json.loads((out / "sapo_final.json").read_text())["step"] == 5
        assert [row["step"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("size", ["4m", "6m", "6656k", "7m"])
def test_a_full_disk_at_other_sizes_is_one_paragraph_with_whole_checkpoints(run_command, tmp_path, size):
    fill_then_check(run_command, tmp_path, size)


def checkpoint_problems(checkpoint: Path) -> list[str]:
    return checksum_problems(checkpoint)


def test_a_file_system_turned_read_only_mid_run_is_one_paragraph_with_whole_checkpoints(run_command, tmp_path):
    with small_disk(tmp_path / "disk", "64m") as disk:
        out = disk / "run"
        process = subprocess.Popen(run_command(out, steps=200), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-2").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.02)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("sapo: error: ")]
        assert len(errors) == 1 and "read-only" in errors[0].lower(), stderr[-2000:]
        assert all(checkpoint_problems(p) == [] for p in out.glob("checkpoint-*"))


def test_a_full_disk_during_the_final_save_leaves_no_partial_set_and_the_same_command_then_completes(run_command,
                                                                                                      tmp_path):
    with small_disk(tmp_path / "disk", "330k") as disk:  # room for the run's start, not for its final set
        out = disk / "run"
        command = run_command(out, "--save_strategy", "no", steps=2)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "sapo: error: no space left on the device" in result.stderr
        assert not (out / "sapo_final.json").exists() and not list(out.glob(".staging/*"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # no checkpoint: start over
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((out / "sapo_final.json").read_text())["step"] == 2
