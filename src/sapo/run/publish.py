"""Durable writes: publishing fully written directories atomically (`publish_directory` for checkpoints,
`publish_final` for the final policy, EMA and card together), finishing an interrupted publish (`recover_staging`),
checksums of every file, and JSON files written durably."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sapo.errors import CheckpointError
from sapo.run.paths import (
    CHECKPOINT_RE,
    CHECKSUMS_FILE,
    FINAL_PARTIAL,
    FINAL_RECORD_FILE,
    FINAL_STAGING,
    STAGING_DIR,
)

logger = logging.getLogger(__name__)

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



def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())



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
