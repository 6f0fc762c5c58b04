"""The pure pieces of checkpointing: the output-dir lock, checksums, settings fingerprints, checkpoint validation,
atomic publishing (and finishing it after a crash), and the torn-line-tolerant metrics file."""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sapo import metrics
from sapo.errors import CheckpointError, OutputDirError, UsageError
from sapo.run import lock as run_lock
from sapo.run import publish as run_publish
from sapo.run import resume as run_resume
from sapo.run.paths import (
    CHECKSUMS_FILE,
    FINAL_RECORD_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    RUN_STATE_FILE,
    STAGING_DIR,
    STATE_DIR,
    TRAINER_STATE_FILE,
)

# ------------------------------------------------------------------------------------------------
# The output-directory lock
# ------------------------------------------------------------------------------------------------


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(out, **changes):
    holder = {**run_lock._this_process(), **changes}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps(holder))
    return holder


def parent_start():
    return run_lock._process_start(os.getppid())[1]


def test_lock_is_taken_released_and_leaves_nothing(tmp_path):
    lock = run_lock.OutputDirLock(tmp_path / "out")
    lock.acquire()
    holder = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.acquire()  # re-entrant
    lock.release()
    assert os.listdir(tmp_path / "out") == []
    lock.release()


def test_live_lock_refuses_naming_the_pid_and_check_output_dir_says_so_first(tmp_path):
    out = tmp_path / "out"
    write_lock(out, pid=os.getppid(), start_ticks=parent_start())  # a live process on this host
    with pytest.raises(OutputDirError, match=rf"in use by another sapo run \(pid {os.getppid()} on host"):
        run_lock.OutputDirLock(out).acquire()
    with pytest.raises(OutputDirError, match=f"pid {os.getppid()}"):
        run_lock.check_output_dir(out, resuming=True, overwrite=True)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getppid()  # untouched
    assert os.listdir(out) == [LOCK_FILE]


@pytest.mark.parametrize("how", ["dead pid", "pid reused", "rebooted"])
def test_stale_lock_is_taken_over(tmp_path, how, caplog):
    out = tmp_path / "out"
    changes = {"dead pid": {"pid": dead_pid()},
               "pid reused": {"pid": os.getppid(), "start_ticks": (parent_start() or 0) + 1},
               "rebooted": {"pid": os.getppid(), "boot_id": "another-boot"}}[how]
    write_lock(out, **changes)
    run_lock.check_output_dir(out, resuming=False, overwrite=False)  # a stale lock alone is no result of a run
    lock = run_lock.OutputDirLock(out)
    lock.acquire()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock of a run that is no longer running" in caplog.text
    lock.release()


def test_lock_from_another_host_is_not_guessed_stale(tmp_path):
    out = tmp_path / "out"
    write_lock(out, host="some-other-host", pid=dead_pid())
    with pytest.raises(OutputDirError, match=r"another host.*delete .*\.sapo\.lock"):
        run_lock.OutputDirLock(out).acquire()


def test_release_leaves_a_lock_taken_over_by_another_owner(tmp_path):
    out = tmp_path / "out"
    first = run_lock.OutputDirLock(out)
    first.acquire()
    second = run_lock.OutputDirLock(out)  # the same process may take its own lock over (a second trainer)
    second.acquire()
    first.release()
    assert (out / LOCK_FILE).exists()
    second.release()
    assert not (out / LOCK_FILE).exists()


def _contend(out, start, results):
    while time.time() < start:
        pass
    lock = run_lock.OutputDirLock(Path(out))
    try:
        lock.acquire()
    except OutputDirError as error:
        results.put(("refused", str(error)))
        return
    results.put(("won", os.getpid()))
    time.sleep(1.0)
    lock.release()


def test_processes_racing_for_an_empty_directory_get_one_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start = time.time() + 0.5
    processes = [context.Process(target=_contend, args=(str(tmp_path / "out"), start, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    winners = [value for kind, value in outcomes if kind == "won"]
    assert len(winners) == 1
    assert all(f"pid {winners[0]}" in value for kind, value in outcomes if kind == "refused")


# ------------------------------------------------------------------------------------------------
# Checksums, settings and checkpoint validation
# ------------------------------------------------------------------------------------------------

PARAMS = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
SETTINGS = {"recipe": "sapo", "loss_type": "sigmoid", "seed": 7, "ema_beta": 0.5, "world_size": 1, "data": "abc"}


def fake_checkpoint(path, settings=SETTINGS, params=PARAMS, **run_state):
    (path / STATE_DIR).mkdir(parents=True)
    (path / TRAINER_STATE_FILE).write_text(json.dumps({"global_step": 4}))
    (path / "model.safetensors").write_bytes(os.urandom(1000))
    (path / "optimizer.pt").write_bytes(os.urandom(500))
    run_resume.write_manifest(path / STATE_DIR, params, {"settings": settings, **run_state})
    (path / STATE_DIR / "ema.safetensors").write_bytes(os.urandom(300))
    run_publish.write_checksums(path)
    return path


def validate(path, settings=SETTINGS, allow=()):
    run_resume.validate_checkpoint(path, PARAMS, [MANIFEST_FILE, RUN_STATE_FILE, "ema.safetensors"], settings=settings,
                             allow_changes=allow)


def test_checksums_record_every_file_and_a_whole_checkpoint_validates(tmp_path):
    path = fake_checkpoint(tmp_path / "checkpoint-4")
    record = json.loads((path / CHECKSUMS_FILE).read_text())["files"]
    assert sorted(record) == sorted(["model.safetensors", "optimizer.pt", f"{STATE_DIR}/{MANIFEST_FILE}",
                                     f"{STATE_DIR}/{RUN_STATE_FILE}", f"{STATE_DIR}/ema.safetensors",
                                     TRAINER_STATE_FILE])
    validate(path)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors has 600 bytes, 1000 when saved"),
    ("flip", "model.safetensors differs from what was saved"),
    ("delete_optimizer", "optimizer.pt is missing"),
    ("garble_parameters", "sapo_state/parameters.json differs from what was saved"),
    ("delete_checksums", "missing sapo_checksums.json"),
    ("garble_checksums", "sapo_checksums.json is unreadable"),
])
def test_damaged_checkpoint_is_refused_naming_the_file_and_an_earlier_one(tmp_path, damage, message):
    fake_checkpoint(tmp_path / "checkpoint-2")
    path = fake_checkpoint(tmp_path / "checkpoint-4")
    model = path / "model.safetensors"
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:600])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[10] ^= 1
        model.write_bytes(bytes(data))
    elif damage == "delete_optimizer":
        (path / "optimizer.pt").unlink()
    elif damage == "garble_parameters":
        text = (path / STATE_DIR / MANIFEST_FILE).read_text()
        (path / STATE_DIR / MANIFEST_FILE).write_text(text.replace("3", "{"))  # same size, not JSON
    elif damage == "delete_checksums":
        (path / CHECKSUMS_FILE).unlink()
    else:
        (path / CHECKSUMS_FILE).write_text("{oops")
    with pytest.raises(CheckpointError, match=message) as refused:
        validate(path)
    if damage != "garble_checksums":
        assert "--resume_from_checkpoint" in str(refused.value) and "checkpoint-2" in str(refused.value)


def test_checkpoint_of_another_model_or_recipe_is_refused(tmp_path):
    path = fake_checkpoint(tmp_path / "checkpoint-4", params={"w": torch.zeros(2, 4), "b": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"written by another run: parameter 'w' has shape \(2, 4\)"):
        validate(path)
    with pytest.raises(CheckpointError, match="missing sapo_state/replay_buffer_rank0.safetensors"):
        run_resume.validate_checkpoint(path, PARAMS, ["replay_buffer_rank0.safetensors"])


def test_changed_settings_are_each_named_and_allowed_only_when_listed(tmp_path):
    path = fake_checkpoint(tmp_path / "checkpoint-4")
    changed = {**SETTINGS, "loss_type": "ipo", "seed": 8, "data": "xyz", "recipe": "sft"}
    with pytest.raises(CheckpointError) as refused:
        validate(path, changed)
    message = str(refused.value)
    for part in ('loss_type (checkpoint "sigmoid", this run "ipo")', "seed (checkpoint 7, this run 8)",
                 "data (the tokenized training data is not the same)", 'recipe (checkpoint "sapo", this run "sft")',
                 "--resume_allow_changes recipe loss_type seed data"):
        assert part in message
    with pytest.raises(CheckpointError, match=r"recipe \(checkpoint"):
        validate(path, changed, allow=["loss_type", "seed", "data"])
    validate(path, changed, allow=["loss_type", "seed", "data", "recipe"])
    with pytest.raises(UsageError, match="unknown setting.*lr"):
        validate(path, SETTINGS, allow=["lr"])


def test_save_only_model_checkpoints_cannot_continue(tmp_path):
    path = fake_checkpoint(tmp_path / "checkpoint-4", save_only_model=True)
    with pytest.raises(CheckpointError, match="save_only_model"):
        validate(path)


def test_run_settings_hold_what_shapes_a_run_and_not_what_may_change():
    from sapo import SAPOConfig
    from sapo.config import sapo_fields

    config = SAPOConfig(output_dir="unused", use_cpu=True, report_to="none", seed=7, max_steps=10)
    settings = run_resume.run_settings(config, [f.name for f in sapo_fields()], world_size=2, data="d")
    for name in ("recipe", "loss_type", "beta", "seed", "ema_beta", "token_generate_length",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type"):
        assert name in settings, name
    assert settings["world_size"] == 2 and settings["data"] == "d" and settings["lr_scheduler_type"] == "linear"
    for name in ("max_steps", "num_train_epochs", "output_dir", "logging_steps", "save_steps", "logprob_chunk_size",
                 "offload_copies", "resume_allow_changes", "overwrite_output_dir"):
        assert name not in settings, name
    json.dumps(settings)


def test_data_fingerprint_sees_every_token():
    items = [{"index": 0, "prompt_ids": [1, 2], "response_ids": [3], "rejected_ids": None},
             {"index": 1, "prompt_ids": [4], "response_ids": [5, 6], "rejected_ids": [7]}]
    base = run_resume.data_fingerprint(items)
    assert run_resume.data_fingerprint([dict(i) for i in items]) == base
    changed = [dict(items[0]), {**items[1], "response_ids": [5, 7]}]
    assert run_resume.data_fingerprint(changed) != base
    moved = [{**items[0], "prompt_ids": [1], "response_ids": [2, 3]}, items[1]]  # same ids, other split
    assert run_resume.data_fingerprint(moved) != base
    assert run_resume.data_fingerprint(items[:1]) != base


# ------------------------------------------------------------------------------------------------
# Atomic publishing
# ------------------------------------------------------------------------------------------------


def staged_dir(path, content):
    path.mkdir(parents=True)
    (path / "file").write_text(content)
    return path


def test_publishing_over_an_existing_checkpoint_swaps_it_in_one_step(tmp_path, monkeypatch):
    final = staged_dir(tmp_path / "checkpoint-8", "old")
    staged = staged_dir(tmp_path / STAGING_DIR / "checkpoint-8", "new")
    removed = []
    original_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # the old copy is deleted only once the new one is in place
        removed.append((Path(path), (final / "file").read_text()))
        original_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    run_publish.publish_directory(staged, final)
    assert (final / "file").read_text() == "new" and not staged.exists()
    assert all(content == "new" for _, content in removed)


def test_without_an_atomic_swap_a_crash_mid_replace_is_undone(tmp_path, monkeypatch):
    final = staged_dir(tmp_path / "checkpoint-8", "old")
    staged = staged_dir(tmp_path / STAGING_DIR / "checkpoint-8", "new")
    monkeypatch.setattr(run_publish, "_exchange", lambda a, b: False)
    calls = []
    original_replace = os.replace

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        original_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_publish.publish_directory(staged, final)
    monkeypatch.setattr(os, "replace", original_replace)
    assert not final.exists()
    run_publish.recover_staging(tmp_path)
    assert (final / "file").read_text() == "old"


def final_set(path, tag):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(f"policy {tag}")
    (path / "README.md").write_text(f"card {tag}")
    (path / "ema").mkdir()
    (path / "ema" / "model.safetensors").write_text(f"ema {tag}")
    return path


def read_final(out):
    return {name: (out / name).read_text() for name in ("model.safetensors", "README.md", "ema/model.safetensors")}


def test_final_outputs_are_published_as_one_set(tmp_path):
    out = tmp_path / "out"
    run_publish.publish_final(final_set(out / STAGING_DIR / "final.partial", "a"), out, step=4)
    assert read_final(out) == {"model.safetensors": "policy a", "README.md": "card a", "ema/model.safetensors": "ema a"}
    record = json.loads((out / FINAL_RECORD_FILE).read_text())
    assert record["step"] == 4 and sorted(record["files"]) == ["README.md", "ema/model.safetensors",
                                                               "model.safetensors"]
    run_publish.publish_final(final_set(out / STAGING_DIR / "final.partial", "b"), out, step=6)
    assert set(read_final(out).values()) == {"policy b", "card b", "ema b"}
    assert not (out / STAGING_DIR).exists()


@pytest.mark.parametrize("moves_before_crash", [0, 1, 2, 3])
def test_a_crash_while_moving_final_outputs_is_finished_by_the_next_start(tmp_path, monkeypatch, moves_before_crash):
    out = tmp_path / "out"
    run_publish.publish_final(final_set(out / STAGING_DIR / "final.partial", "a"), out, step=4)
    original_replace = os.replace
    moves = []

    def crash(src, dst):  # killed after some entries of the committed set were moved into place
        if Path(src).parent.name == "final":
            if len(moves) == moves_before_crash:
                raise KeyboardInterrupt("killed")
            moves.append(dst)
        original_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        run_publish.publish_final(final_set(out / STAGING_DIR / "final.partial", "b"), out, step=6)
    monkeypatch.setattr(os, "replace", original_replace)
    assert not (out / FINAL_RECORD_FILE).exists()  # no record while the set in place is mixed
    run_publish.recover_staging(out)
    assert set(read_final(out).values()) == {"policy b", "card b", "ema b"}
    assert json.loads((out / FINAL_RECORD_FILE).read_text())["step"] == 6
    assert not (out / STAGING_DIR).exists()


def test_an_unfinished_final_save_is_dropped(tmp_path):
    out = tmp_path / "out"
    final_set(out / STAGING_DIR / "final.partial", "a")
    run_publish.recover_staging(out)
    assert not (out / "model.safetensors").exists() and not (out / STAGING_DIR).exists()
    run_publish.recover_staging(tmp_path / "nothing here")


# ------------------------------------------------------------------------------------------------
# metrics.jsonl
# ------------------------------------------------------------------------------------------------


def metrics_file(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


ROWS = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "train_runtime": 3.0},
        {"step": 3, "loss": 0.25}]


def test_a_torn_last_line_is_dropped_when_reading(tmp_path):
    path = metrics_file(tmp_path / "metrics.jsonl", ROWS, tail='{"step": 4, "lo')
    assert metrics.read_metrics(path) == ROWS
    path.write_bytes(path.read_bytes()[:-3] + b"\xe2\x82")  # cut inside a UTF-8 character
    assert metrics.read_metrics(path) == ROWS


def test_truncating_keeps_the_rows_of_the_resumed_step_atomically(tmp_path):
    path = metrics_file(tmp_path / "metrics.jsonl", ROWS, tail='{"step": 4, "lo')
    metrics.truncate_metrics(path, 2)
    assert metrics.read_metrics(path) == ROWS[:2]  # the end-of-training row of a run stopped at 2 is dropped
    assert path.read_text().endswith("\n")
    metrics_file(path, ROWS, tail='{"st')
    metrics.truncate_metrics(path, 2, keep_summary=True)  # a finished run: nothing is logged again
    assert metrics.read_metrics(path) == ROWS[:3]
    metrics.truncate_metrics(path, 0)
    assert path.read_text() == ""
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
