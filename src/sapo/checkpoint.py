"""Checkpoint and output-directory rules: what a run may write where, and how it is made durable.

These are the pieces of checkpointing that do not need the Trainer, each a plain function or small class:

- one writer per output directory (`OutputDirLock`: a lock file naming the run, taken over once that run is gone);
- refusing to mix a new run with another's results (`check_output_dir`);
- publishing fully written directories atomically (`publish_directory` for checkpoints, `publish_final` for the
  final policy, EMA and card together) and finishing an interrupted publish (`recover_staging`);
- what a checkpoint must hold to resume exactly (`write_checksums`, `run_settings`, `validate_checkpoint`): every
  file with its size and sha256, the trainable parameters' shapes, and the settings that shape the trajectory;
- keeping `metrics.jsonl` in step with the checkpoint resumed, tolerating a torn last line (`truncate_metrics`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sapo.errors import CheckpointError, OutputDirError, UsageError
from sapo.layout import (
    CHECKPOINT_RE,
    CHECKSUMS_FILE,
    FINAL_PARTIAL,
    FINAL_RECORD_FILE,
    FINAL_STAGING,
    LOCK_FILE,
    MANIFEST_FILE,
    RUN_STATE_FILE,
    STAGING_DIR,
    STATE_DIR,
    TRAINER_STATE_FILE,
)
from sapo.outdir import holds_results, not_empty_message
from sapo.sharding import global_shape

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The output directory: one writer, no mixing with another run's results
# ------------------------------------------------------------------------------------------------


def check_output_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse a directory another live run is writing, and refuse to mix a new run's files with another run's
    results (the start files of a run killed before its first checkpoint do not count: see `sapo.outdir`)."""
    check_output_lock(out)
    if holds_results(out) and not resuming and not overwrite:
        raise OutputDirError(not_empty_message(out))


def clear_previous_checkpoints(out: Path) -> list[Path]:
    """An overwriting run first removes the previous run's checkpoints (directories `checkpoint-N` holding a
    `sapo_state/`): otherwise rotation, which keeps the highest step numbers, would delete the new run's own
    checkpoints while the old ones stay, and `--resume_from_checkpoint true` could pick an old one. Other files
    are left alone; the final outputs are replaced when the new run publishes its own."""
    removed = []
    for entry in sorted(out.iterdir()) if out.is_dir() else ():
        if CHECKPOINT_RE.fullmatch(entry.name) and entry.is_dir() and (entry / STATE_DIR).is_dir():
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (None when `path` exists): what a run would create."""
    if os.path.lexists(path):
        return None
    while not os.path.lexists(path.parent):
        path = path.parent
    return path


def remove_if_created_empty(out: Path, created: Path | None) -> None:
    """Remove the empty directories a refused run created, from output_dir up to the outermost one it made."""
    if created is None:
        return
    directory = out
    while True:
        if not directory.is_dir() or any(directory.iterdir()):
            return
        directory.rmdir()
        if directory == created or directory == directory.parent:
            return
        directory = directory.parent


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> tuple[bool, int | None]:
    """Whether `pid` is a running process on this host, and its start time (clock ticks since boot; None where
    /proc is unavailable). A zombie counts as gone."""
    if pid <= 0:
        return False, None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:  # another user's process: it exists
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True, None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False, None
    return True, int(fields[19])


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_ticks": _process_start(pid)[1],
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300],
            "token": secrets.token_hex(8)}  # tells two locks of one process apart


def lock_holder_state(holder: Mapping[str, Any]) -> str:
    """'ours' (this process), 'live' (another running process on this host), 'stale' (that process is gone: it
    crashed or was killed, its pid was reused, or the machine rebooted) or 'unknown' (another host: not checkable)."""
    if holder.get("host") != socket.gethostname():
        return "unknown"
    if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return "stale"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "stale"
    alive, start = _process_start(pid)
    if not alive or (holder.get("start_ticks") is not None and start is not None and start != holder["start_ticks"]):
        return "stale"
    return "ours" if pid == os.getpid() else "live"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _parse_lock(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _locked_message(out: Path, holder: Mapping[str, Any], state: str) -> str:
    who = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
    command = f", command: {holder['command']}" if holder.get("command") else ""
    hint = (f"; it runs on another host, so this one cannot check whether it still runs: if it does not, delete "
            f"{out / LOCK_FILE}" if state == "unknown" else "")
    return (f"output_dir {out} is in use by another sapo run ({who}{command}); two runs writing one directory would "
            f"mix their checkpoints, metrics and final model. Wait for it to end, stop it, or choose another "
            f"--output_dir{hint}")


def check_output_lock(out: Path) -> None:
    """Raise `OutputDirError` when another run that is still alive (or on another host) holds `out`'s lock. Only
    the main process of a launch checks (RANK 0 or unset): the lock is its business, and a rank on another node
    could not tell whether it is stale."""
    if os.environ.get("RANK", "0") != "0":
        return
    holder = _parse_lock(_read_text(out / LOCK_FILE) or "")
    if holder is not None:
        state = lock_holder_state(holder)
        if state in ("live", "unknown"):
            raise OutputDirError(_locked_message(out, holder, state))


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _link_exclusive(source: Path, target: Path, text: str) -> bool:
    """Create `target` with `text` only if it does not exist, all at once: a hard link of a complete file (an
    O_EXCL create where the file system has no hard links). False if `target` exists."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True


@contextlib.contextmanager
def _directory_guard(directory: Path) -> Iterator[None]:
    """An advisory flock on the directory while a stale lock is replaced, so two runs taking it over at once cannot
    remove each other's new lock (released by the kernel if the process dies; skipped where unsupported)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class OutputDirLock:
    """One writer per output directory: `output_dir/.sapo.lock` holds the pid, host, boot id and start time of the
    run writing there. It is created all at once and only if absent; a lock whose process is gone on this host
    (crashed, killed, pid reused, machine rebooted) is stale and taken over with a warning. Released by `release`,
    and at interpreter exit as a fallback; a killed process leaves a stale lock, which the next run takes over."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._content: str | None = None

    @property
    def held(self) -> bool:
        return self._content is not None

    def acquire(self) -> None:
        if self.held:
            return
        content = json.dumps(_this_process())
        self.directory.mkdir(parents=True, exist_ok=True)
        staged = self.directory / f"{LOCK_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        _write_durably(staged, content)
        try:
            for _ in range(20):
                if _link_exclusive(staged, self.path, content):
                    self._content = content
                    atexit.register(self.release)
                    return
                existing = _read_text(self.path)
                if existing is None:  # released in between: try again
                    continue
                holder = _parse_lock(existing)
                if holder is None:
                    raise OutputDirError(f"{self.path} is not a lock file sapo can read; if no run is writing "
                                         f"{self.directory}, delete it and start again")
                state = lock_holder_state(holder)
                if state in ("live", "unknown"):
                    raise OutputDirError(_locked_message(self.directory, holder, state))
                with _directory_guard(self.directory):
                    if _read_text(self.path) == existing:  # nobody took it over meanwhile
                        self.path.unlink()
                if state == "stale":
                    logger.warning("output_dir %s: taking over the lock of a run that is no longer running (pid %s "
                                   "on %s, since %s)", self.directory, holder.get("pid"), holder.get("host"),
                                   holder.get("since"))
            raise OutputDirError(f"could not lock output_dir {self.directory}: {self.path} keeps changing (several "
                                 "runs starting into it at once?)")
        finally:
            staged.unlink(missing_ok=True)

    def still_ours(self) -> bool:
        """Whether the lock file is still there with this run's content (not deleted with the directory, not taken
        over by another run)."""
        return self._content is not None and _read_text(self.path) == self._content

    def release(self) -> None:
        if self._content is None:
            return
        try:
            if _read_text(self.path) == self._content:
                self.path.unlink()
        except OSError:
            pass
        finally:
            self._content = None
            atexit.unregister(self.release)


# ------------------------------------------------------------------------------------------------
# Atomic publishing
# ------------------------------------------------------------------------------------------------


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


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` durably: the old content or the new one, never a mix or a truncated file."""
    staged = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_durably(staged, text)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def publish_directory(staged: Path, final: Path) -> None:
    """Durably move a fully written directory into place. A directory already there (a checkpoint of the same step
    written before) is swapped out in one step, so `final` is never missing or partly deleted."""
    _fsync_tree(staged)
    if final.exists():
        if _exchange(staged, final):  # `staged` now holds the old directory
            _fsync_dir(final.parent)
            shutil.rmtree(staged)
            return
        aside = staged.with_name(f"{staged.name}.replaced")  # recover_staging puts it back after a crash here
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(staged, final)
        _fsync_dir(final.parent)
        shutil.rmtree(aside)
        return
    os.replace(staged, final)
    _fsync_dir(final.parent)


def publish_final(staged: Path, out: Path, step: int) -> None:
    """Publish the final outputs written into `staged` (policy, tokenizer, `ema/`, card) as one set.

    The set is checksummed, then committed with one rename to `.staging/final`; from then on it is moved into
    `out` entry by entry, `sapo_final.json` (step and checksums) last. A crash during the moves is finished by
    `recover_staging` at the next start, so `out` ends with the whole new set, and `sapo_final.json` is present
    exactly when the final files in place are one complete set."""
    _write_durably(staged / FINAL_RECORD_FILE, json.dumps({"step": step, "files": directory_checksums(staged)}))
    _fsync_tree(staged)
    committed = out / STAGING_DIR / FINAL_STAGING
    if committed.exists():
        shutil.rmtree(committed)
    os.replace(staged, committed)
    _fsync_dir(committed.parent)
    _move_final_into_place(out)


def _move_final_into_place(out: Path) -> None:
    """Move a committed `.staging/final` into `out`; idempotent, so a crash part-way is finished by a rerun."""
    committed = out / STAGING_DIR / FINAL_STAGING
    if not committed.is_dir():
        return
    if (committed / FINAL_RECORD_FILE).exists():
        (out / FINAL_RECORD_FILE).unlink(missing_ok=True)  # the previous set's record no longer describes out
        for entry in sorted(committed.iterdir()):
            if entry.name == FINAL_RECORD_FILE:
                continue
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                trash = out / STAGING_DIR / f"trash-{secrets.token_hex(4)}"
                os.replace(target, trash)
                os.replace(entry, target)
                shutil.rmtree(trash)
            else:
                os.replace(entry, target)
        _fsync_dir(out)
        os.replace(committed / FINAL_RECORD_FILE, out / FINAL_RECORD_FILE)
        _fsync_dir(out)
    shutil.rmtree(committed)
    with contextlib.suppress(OSError):  # leave no empty .staging behind a finished run (checkpoints recreate it)
        committed.parent.rmdir()


def recover_staging(out: Path) -> None:
    """Before a run writes into `out`: finish moving final outputs that were committed when a run died, put back a
    checkpoint set aside for replacement (systems without an atomic swap), and drop unfinished partial writes."""
    staging = out / STAGING_DIR
    _move_final_into_place(out)
    if not staging.is_dir():
        return
    for entry in staging.iterdir():
        if entry.name.endswith(".replaced") and not (out / entry.name.removesuffix(".replaced")).exists():
            os.replace(entry, out / entry.name.removesuffix(".replaced"))
        elif (entry.name.endswith(".replaced") or entry.name.startswith("trash-") or entry.name == FINAL_PARTIAL
              or CHECKPOINT_RE.fullmatch(entry.name)):  # a checkpoint still in staging was never finished
            shutil.rmtree(entry, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.rmdir()  # only when empty


# ------------------------------------------------------------------------------------------------
# What a checkpoint records so that a resume is exact or refused
# ------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was written at (0 when it has no trainer state)."""
    state = Path(path) / TRAINER_STATE_FILE
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def directory_checksums(root: Path, exclude: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `root` (relative POSIX paths), hashed on several threads."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_sha256, files))
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": d}
            for p, d in zip(files, digests, strict=True)}


def write_checksums(directory: Path) -> None:
    """Record every file of a fully written checkpoint (written last, by the main process)."""
    _write_durably(directory / CHECKSUMS_FILE,
                   json.dumps({"files": directory_checksums(directory, exclude=(CHECKSUMS_FILE,))}))


def checksum_problems(directory: Path, *, content: bool = True, limit: int = 6) -> list[str]:
    """Files recorded at save time that are now missing, of another size, or (with `content`) of other bytes."""
    record = read_json(directory / CHECKSUMS_FILE).get("files")
    if not isinstance(record, dict):
        raise CheckpointError(f"{directory}: {CHECKSUMS_FILE} holds no file list")
    problems = []
    for name, expected in sorted(record.items()):
        file = directory / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != expected.get("size"):
            problems.append(f"{name} has {file.stat().st_size} bytes, {expected.get('size')} when saved")
    if content and not problems:
        names = sorted(record)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(_sha256, [directory / name for name in names]))
        problems = [f"{name} differs from what was saved (sha256)" for name, digest in zip(names, digests, strict=True)
                    if digest != record[name].get("sha256")]
    return problems[:limit] + ([f"{len(problems) - limit} more"] if len(problems) > limit else [])


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file; anything unreadable is a `CheckpointError` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is unreadable (not a JSON object)")
    return value


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(dict(value)), encoding="utf-8")


def write_manifest(directory: Path, params: Mapping[str, torch.Tensor], run_state: Mapping[str, Any]) -> None:
    """The trainable parameters' names and (global) shapes, and run-level values that are not tensors (among them
    the settings that shape the run, see `run_settings`)."""
    write_json(directory / MANIFEST_FILE, {name: list(global_shape(p)) for name, p in params.items()})
    write_json(directory / RUN_STATE_FILE, run_state)


def read_run_state(directory: Path) -> dict[str, Any]:
    return read_json(directory / RUN_STATE_FILE)


# TrainingArguments fields that shape the trajectory (optimizer, schedule, batches, precision, order of the data).
# Fields missing from an installed transformers version are skipped.
TRAINER_TRAJECTORY_FIELDS = (
    "seed", "data_seed", "full_determinism", "per_device_train_batch_size", "gradient_accumulation_steps",
    "dataloader_drop_last", "group_by_length", "train_sampling_strategy", "ignore_data_skip", "learning_rate",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "optim", "optim_args", "bf16", "fp16", "neftune_noise_alpha",
)
# SAPO fields a resumed run may change freely: memory knobs, stopping and bookkeeping (skip_invalid acts through
# the data, which is compared by its fingerprint).
FREE_SAPO_FIELDS = ("logprob_chunk_size", "offload_copies", "max_nonfinite_steps", "overwrite_output_dir",
                    "skip_invalid", "resume_allow_changes", "eval_judge", "eval_judge_max_new_tokens")
DATA_SETTING = "data"
WORLD_SIZE_SETTING = "world_size"
START_WEIGHTS_SETTING = "start_weights"  # sha256 of the weights the run started from (see sapo.start_weights)
REFERENCE_WEIGHTS_SETTING = "reference_weights"  # the same, of a ref_model given apart from the policy
FINGERPRINTS = {DATA_SETTING: "the tokenized training data is not the same",
                START_WEIGHTS_SETTING: "the weights this run starts from are not those the checkpoint's run started "
                "from (--model_name_or_path)",
                REFERENCE_WEIGHTS_SETTING: "the reference model's weights are not the same"}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def run_settings(config: Any, sapo_field_names: Sequence[str], *, world_size: int, data: str,
                 start_weights: str | None = None, reference_weights: str | None = None) -> dict[str, Any]:
    """The settings that shape a run's trajectory, as JSON values: every SAPO field but `FREE_SAPO_FIELDS`, the
    Trainer fields in `TRAINER_TRAJECTORY_FIELDS`, the number of processes and fingerprints of the tokenized data
    and of the start (and a separate reference's) weights. The run's length (max_steps, num_train_epochs) is not
    among them: a run may be resumed to train longer."""
    settings = {name: _plain(getattr(config, name)) for name in _config_setting_names(config, sapo_field_names)}
    settings[WORLD_SIZE_SETTING] = world_size
    settings[DATA_SETTING] = data
    settings[START_WEIGHTS_SETTING] = start_weights
    settings[REFERENCE_WEIGHTS_SETTING] = reference_weights
    return settings


def _config_setting_names(config: Any, sapo_field_names: Sequence[str]) -> list[str]:
    names = [n for n in sapo_field_names if n not in FREE_SAPO_FIELDS]
    return names + [n for n in TRAINER_TRAJECTORY_FIELDS if hasattr(config, n) and n not in names]


def run_setting_names(config: Any, sapo_field_names: Sequence[str]) -> list[str]:
    """The names `run_settings` compares, without computing the data fingerprint."""
    return [*_config_setting_names(config, sapo_field_names), WORLD_SIZE_SETTING, *FINGERPRINTS]


def data_fingerprint(dataset: Any) -> str:
    """sha256 over every item's token ids (what the model trains on, after templates, truncation and dropping)."""
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        item = dataset[index]
        for key in sorted(item):
            if key == "index":
                continue
            value = item[key]
            digest.update(key.encode())
            try:
                digest.update(b"-" if value is None else array("q", value).tobytes())
            except TypeError:
                digest.update(json.dumps(value, default=str, sort_keys=True).encode())
        digest.update(b"\n")
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()


def check_allowed_changes(allowed: Sequence[str], known: Sequence[str]) -> None:
    unknown = sorted(set(allowed) - set(known))
    if unknown:
        raise UsageError(f"resume_allow_changes: unknown setting(s) {', '.join(unknown)}; the settings compared on "
                         f"resume are {', '.join(sorted(known))} (max_steps and num_train_epochs may change without "
                         "it)")


def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                         allowed: Sequence[str] = ()) -> list[str]:
    """Each setting that differs from the checkpoint's and was not named in `allowed`, described for a message.
    Settings the checkpoint does not record (written by another sapo version) are not compared."""
    check_allowed_changes(allowed, list(current))
    differences = []
    for name, value in current.items():
        if name in FINGERPRINTS and (saved.get(name) is None or value is None):
            continue  # not recorded (an older sapo), or the files could not be read
        if name in saved and saved[name] != value and name not in allowed:
            if name == DATA_SETTING:
                differences.append(f"{name} ({FINGERPRINTS[name]})")
            elif name in FINGERPRINTS:
                differences.append(f"{name} ({FINGERPRINTS[name]}: checkpoint {str(saved[name])[:24]}..., this "
                                   f"run {str(value)[:24]}...)")
            else:
                differences.append(f"{name} (checkpoint {json.dumps(saved[name])}, this run {json.dumps(value)})")
    return differences


def _earlier_checkpoints_hint(path: Path) -> str:
    step = CHECKPOINT_RE.fullmatch(path.name)
    if step is None or not path.parent.is_dir():
        return ""
    earlier = sorted((int(m.group(1)), p) for p in path.parent.iterdir()
                     if (m := CHECKPOINT_RE.fullmatch(p.name)) and int(m.group(1)) < int(step.group(1)))
    return f"; an earlier checkpoint may still be whole: --resume_from_checkpoint {earlier[-1][1]}" if earlier else ""


def _check_step(path: Path) -> None:
    """The checkpoint's step agrees in its name, the Trainer's trainer_state.json and sapo's own record of it."""
    trainer_step = read_json(path / TRAINER_STATE_FILE).get("global_step")
    recorded = read_run_state(path / STATE_DIR).get("global_step")
    named = CHECKPOINT_RE.fullmatch(path.name)
    steps = {f"{TRAINER_STATE_FILE} (global_step)": trainer_step, f"{STATE_DIR}/{RUN_STATE_FILE}": recorded,
             "its name": int(named.group(1)) if named else None}
    known = {where: step for where, step in steps.items() if step is not None}
    if len(set(known.values())) > 1:
        raise CheckpointError(f"{path}: its step is not one step: " + ", ".join(
            f"{where} says {step}" for where, step in known.items()) + "; it was assembled from different "
            f"checkpoints or renamed, so it cannot resume exactly{_earlier_checkpoints_hint(path)}")


def validate_checkpoint(path: Path, params: Mapping[str, torch.Tensor], state_files: Sequence[str], *,
                        settings: Mapping[str, Any] | None = None, allow_changes: Sequence[str] = (),
                        verify_content: bool = True) -> None:
    """Check, reading only, that `path` resumes this run exactly: every file the run needs is there, every file is
    as it was saved (size, and sha256 with `verify_content`), the trainable parameters are this model's, the
    checkpoint can continue training, and the run's `settings` equal the checkpoint's (but those in
    `allow_changes`). Each failure is a `CheckpointError` naming what is wrong."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    required = [TRAINER_STATE_FILE, CHECKSUMS_FILE, *(f"{STATE_DIR}/{name}" for name in state_files)]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete sapo checkpoint of this kind of run "
                              f"(missing {', '.join(missing)}){_earlier_checkpoints_hint(path)}")
    problems = checksum_problems(path, content=verify_content)
    if problems:
        raise CheckpointError(f"{path}: damaged checkpoint ({'; '.join(problems)}), so it cannot resume the run "
                              f"exactly{_earlier_checkpoints_hint(path)}")
    _check_step(path)
    manifest = read_json(path / STATE_DIR / MANIFEST_FILE)
    for name, param in params.items():
        if name not in manifest:
            raise CheckpointError(f"{path}: written by another run: it has no parameter {name!r}")
        if tuple(manifest[name]) != global_shape(param):
            raise CheckpointError(f"{path}: written by another run: parameter {name!r} has shape "
                                  f"{tuple(manifest[name])}, this model {global_shape(param)}")
    run_state = read_run_state(path / STATE_DIR)
    if run_state.get("save_only_model"):
        raise CheckpointError(f"{path}: written with save_only_model, so it holds no optimizer, scheduler or RNG "
                              "state and training cannot continue exactly from it; start a new run from its weights")
    if settings is None:
        return
    saved = run_state.get("settings")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: records no run settings (written by an older sapo), so an exact resume "
                              "cannot be checked")
    differences = settings_differences(saved, settings, allow_changes)
    if differences:
        names = " ".join(d.split(" ", 1)[0] for d in differences)
        raise CheckpointError(f"{path}: this run's settings differ from those the checkpoint was trained with, so "
                              f"resuming would not continue the same run: {'; '.join(differences)}. Resume with the "
                              f"checkpoint's settings, or pass --resume_allow_changes {names} to change them "
                              "deliberately")


# ------------------------------------------------------------------------------------------------
# metrics.jsonl
# ------------------------------------------------------------------------------------------------


def _metrics_lines(path: Path) -> list[tuple[bytes, dict[str, Any]]]:
    """Each readable line with its row. A torn last line (a write cut short by a crash or a full disk) is dropped;
    an unreadable line elsewhere is dropped with a warning."""
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if number == len(lines):
                logger.info("%s: dropping a torn last line (a write cut short)", path)
            else:
                logger.warning("%s:%d: dropping an unreadable line", path, number)
            continue
        rows.append((line, row))
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, tolerating a torn last line."""
    return [row for _, row in _metrics_lines(path)]


def is_summary_row(row: Mapping[str, Any]) -> bool:
    """The Trainer's end-of-training row (runtime, mean loss), logged after the last step."""
    return "train_runtime" in row


def truncate_metrics(path: Path, keep_until_step: int, *, keep_summary: bool = False) -> None:
    """Keep the rows a run resumed from step `keep_until_step` would have logged by then, so its metrics.jsonl reads
    as if it had never stopped: rows of earlier steps, and at that step the logging row but not an end-of-training
    row (unless `keep_summary`: the resumed run is already finished). 0 empties the file (a fresh run). The file is
    replaced atomically."""
    kept = [line for line, row in _metrics_lines(path) if keep_until_step > 0 and (
        row.get("step", 0) < keep_until_step
        or (row.get("step", 0) == keep_until_step and (keep_summary or not is_summary_row(row))))]
    atomic_write_text(path, "".join(line.decode("utf-8") + "\n" for line in kept))


def save_metrics_rows(live: Path, target: Path, step: int) -> None:
    """Copy into a checkpoint the rows of `live` (metrics.jsonl) logged up to its `step`, so a resume restores
    them even when metrics.jsonl was deleted or damaged meanwhile."""
    rows = _metrics_lines(live) if live.is_file() else []
    _write_durably(target, "".join(line.decode("utf-8") + "\n" for line, row in rows
                                   if row.get("step", 0) <= step and not is_summary_row(row)))


def restore_metrics(live: Path, saved: Path, step: int, *, keep_summary: bool = False) -> None:
    """Bring metrics.jsonl back to a resumed `step`: the rows the checkpoint holds (`saved`), plus, with
    `keep_summary`, the end-of-training row at that step; a checkpoint without its rows (an older sapo) truncates
    the file instead (`truncate_metrics`)."""
    if not saved.is_file():
        if live.exists():
            truncate_metrics(live, step, keep_summary=keep_summary)
        return
    kept = [line for line, _ in _metrics_lines(saved)]
    present = [line for line, row in _metrics_lines(live) if row.get("step", 0) <= step] if live.is_file() else []
    if [line for line in present if line in set(kept)] != kept:
        logger.warning("%s: %s; the %d rows up to step %d are restored from the checkpoint", live,
                       "missing" if not live.exists() else "rows were lost or damaged", len(kept), step)
    if keep_summary:
        kept += [line for line in present if is_summary_row(json.loads(line)) and json.loads(line).get("step") == step]
    atomic_write_text(live, "".join(line.decode("utf-8") + "\n" for line in kept))


# ------------------------------------------------------------------------------------------------
# RNG state and signals
# ------------------------------------------------------------------------------------------------


def rng_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return version, tuple(internal), gauss


@contextlib.contextmanager
def on_stop_signals(request_stop: Callable[[str, int], None],
                    doing: str = "saving a checkpoint after the current step") -> Iterator[None]:
    """While training (or saving): SIGINT/SIGTERM call `request_stop(reason, exit_code)` so the run can finish its
    step (or save) and make it durable; the handlers are then removed, so a second signal kills at once. Only the
    main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        logger.warning("%s received: %s (send again to kill)", name, doing)
        request_stop(f"{name} received", 128 + signum)
        for sig, old in previous.items():  # Python's own SIGINT handler would raise KeyboardInterrupt: a traceback,
            # and cleanup that may take long (a thread pool hashing a checkpoint finishes first), not a kill
            signal.signal(sig, signal.SIG_DFL if old in (signal.default_int_handler, None) else old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
