"""What an output directory may be, and what a new run clears from it before writing anything.

- It is never one of the run's inputs, nor inside or around one (`refuse_inputs_in_output_dir`): an overwriting
  run would otherwise replace the model it trains from, or delete its data.
- A run killed before its first checkpoint leaves only its own start files (the lock, `metrics.jsonl`, a staged
  checkpoint cut short); there is nothing to resume and nothing to lose, so a plain rerun starts over there
  (`holds_only_start_files`), and each refusal names the command that works (`no_checkpoint_message`).
- An overwriting run first removes the previous run's final outputs, record first (`clear_previous_final`), so
  a kill before its own final save can never leave the old model looking like the new run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from sapo.errors import UsageError
from sapo.run.paths import CHECKPOINT_RE, FINAL_RECORD_FILE, FINAL_STAGING, LOCK_FILE, METRICS_FILE, STAGING_DIR

logger = logging.getLogger(__name__)


def _real(path: str | os.PathLike) -> Path:
    """The path with every symbolic link resolved, also where its tail does not exist yet."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def refuse_inputs_in_output_dir(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an output directory that is, contains or lies inside a local input path (`inputs`: option name ->
    path; hub ids and inline values, which are no local path, are skipped). Symbolic links are resolved."""
    target = _real(out)
    for option, value in inputs.items():
        if value is None or not str(value).strip() or not os.path.lexists(os.path.expanduser(str(value))):
            continue
        source = _real(value)
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "lies inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise UsageError(f"output_dir {out} {relation} the input of --{option} ({value}"
                         f"{'' if str(source) == str(value) else f', that is {source}'}): training writes and, with "
                         f"--overwrite_output_dir, deletes there, which would destroy the input; choose an "
                         f"--output_dir outside it")


def has_checkpoints(out: Path) -> bool:
    return out.is_dir() and any(CHECKPOINT_RE.fullmatch(entry.name) and entry.is_dir() for entry in out.iterdir())


def _is_start_file(entry: Path) -> bool:
    """A file a run writes before its first checkpoint: the lock (and its staged copies), metrics.jsonl, and a
    staging directory holding no committed final outputs."""
    if entry.name.startswith(LOCK_FILE) or entry.name == METRICS_FILE:
        return True
    return entry.name == STAGING_DIR and entry.is_dir() and not (entry / FINAL_STAGING).exists()


def holds_results(out: Path) -> bool:
    """Whether `out` holds anything a new run would mix with or lose: a checkpoint, final outputs, or any file that
    is not one of a run's start files."""
    return out.is_dir() and not all(_is_start_file(entry) for entry in out.iterdir())


def holds_only_start_files(out: Path) -> bool:
    """`out` holds files besides a lock, all of them a run's start files: a run killed before its first
    checkpoint."""
    return (out.is_dir() and any(not entry.name.startswith(LOCK_FILE) for entry in out.iterdir())
            and not holds_results(out))


def no_checkpoint_message(out: Path) -> str:
    """Why `--resume_from_checkpoint true` has nothing to resume, and the command that works instead."""
    if not out.is_dir() or not holds_results(out):
        return (f"resume_from_checkpoint=true but {out} has no checkpoint: the run stopped before its first one (they "
                "are written every save_steps steps), so there is nothing to resume; run the same command without "
                "--resume_from_checkpoint to start over (it reuses the directory)")
    return (f"resume_from_checkpoint=true but {out} has no checkpoint to resume (it holds other results, e.g. a "
            "final model of a run saved without checkpoints); to train again into it, run the same command with "
            "--overwrite_output_dir true instead of --resume_from_checkpoint")


def not_empty_message(out: Path) -> str:
    """Why a new run may not write into `out`, and the commands that work."""
    resume = " or --resume_from_checkpoint true to continue the run it holds" if has_checkpoints(out) else ""
    return (f"output_dir {out} is not empty; pass --overwrite_output_dir true to train into it anyway (the previous "
            f"run's checkpoints and final outputs are removed first){resume}")


def clear_previous_final(out: Path) -> list[str]:
    """Remove the previous run's final outputs before an overwriting run writes anything: `sapo_final.json` first
    (so nothing reads the old set as complete), then every file it lists, then directories left empty (`ema/`).
    Returns the names removed."""
    record = out / FINAL_RECORD_FILE
    if not record.is_file():
        return []
    try:
        files = json.loads(record.read_text(encoding="utf-8")).get("files") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        files = {}
    record.unlink()
    _fsync_dir(out)
    removed = [FINAL_RECORD_FILE]
    for name in sorted(files):
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
    for name in sorted({Path(name).parts[0] for name in files if len(Path(name).parts) > 1}):
        directory = out / name
        if directory.is_dir() and not any(p.is_file() for p in directory.rglob("*")):
            shutil.rmtree(directory)
    _fsync_dir(out)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
