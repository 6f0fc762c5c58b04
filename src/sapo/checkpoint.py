"""Checkpoint and output-directory rules: what a run may write where, and how it is made durable.

These are the pieces of checkpointing that do not need the Trainer: refusing to mix a new run with
another's results, publishing a fully written directory atomically, checking that a checkpoint belongs to
this model before anything is written, and keeping `metrics.jsonl` in step with the checkpoint resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sapo.errors import CheckpointError, OutputDirError
from sapo.layout import MANIFEST_FILE, RUN_STATE_FILE, STATE_DIR, TRAINER_STATE_FILE
from sapo.sharding import global_shape

logger = logging.getLogger(__name__)


def check_output_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix a new run's files with another run's results."""
    if out.is_dir() and any(out.iterdir()) and not resuming and not overwrite:
        raise OutputDirError(f"output_dir {out} is not empty; pass --overwrite_output_dir to train into it "
                             "anyway, or --resume_from_checkpoint to continue the run it holds")


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was written at (0 when it has no trainer state)."""
    state = Path(path) / TRAINER_STATE_FILE
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Drop rows logged after the resumed checkpoint (or all rows for a fresh run), so a resumed run's
    metrics.jsonl reads as if it had never stopped."""
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")


def write_manifest(directory: Path, params: Mapping[str, torch.Tensor], run_state: Mapping[str, Any]) -> None:
    """The trainable parameters' names and (global) shapes, and run-level values that are not tensors."""
    (directory / MANIFEST_FILE).write_text(json.dumps({name: list(global_shape(p)) for name, p in params.items()}))
    (directory / RUN_STATE_FILE).write_text(json.dumps(dict(run_state)))


def read_run_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / RUN_STATE_FILE).read_text())


def validate_checkpoint(path: Path, params: Mapping[str, torch.Tensor], state_files: Sequence[str]) -> None:
    """Check that `path` is a complete sapo checkpoint of a model with exactly these trainable parameters."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    required = [path / TRAINER_STATE_FILE, *(path / STATE_DIR / name for name in state_files)]
    missing = [str(p.relative_to(path)) for p in required if not p.exists()]
    if missing:
        raise CheckpointError(f"{path}: not a complete sapo checkpoint of this kind of run "
                              f"(missing {', '.join(missing)})")
    manifest = json.loads((path / STATE_DIR / MANIFEST_FILE).read_text())
    for name, param in params.items():
        if name not in manifest:
            raise CheckpointError(f"{path}: written by another run: it has no parameter {name!r}")
        if tuple(manifest[name]) != global_shape(param):
            raise CheckpointError(f"{path}: written by another run: parameter {name!r} has shape "
                                  f"{tuple(manifest[name])}, this model {global_shape(param)}")


def publish_directory(staged: Path, final: Path) -> None:
    """Durably move a fully written directory into place (replacing a stale one of the same name)."""
    _fsync_tree(staged)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_dir(final.parent)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for file in files:
            with open(os.path.join(directory, file), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return version, tuple(internal), gauss


@contextlib.contextmanager
def on_stop_signals(request_stop: Callable[[str, int], None]) -> Iterator[None]:
    """While training: SIGINT/SIGTERM call `request_stop(reason, exit_code)` so the run can finish its step and
    save a checkpoint; the handlers are then removed, so a second signal kills at once. Only the main thread can
    install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint after the current step (send again to kill)", name)
        request_stop(f"{name} received", 128 + signum)
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
