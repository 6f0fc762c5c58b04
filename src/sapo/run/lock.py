"""One writer per output directory (`OutputDirLock`: a lock file naming the run, taken over once that run is
gone), and refusing to mix a new run with another's results (`check_output_dir`)."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sapo.errors import OutputDirError
from sapo.run.outdir import holds_results, not_empty_message
from sapo.run.paths import (
    CHECKPOINT_RE,
    LOCK_FILE,
    STATE_DIR,
)
from sapo.run.publish import _write_durably

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The output directory: one writer, no mixing with another run's results
# ------------------------------------------------------------------------------------------------


def check_output_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse a directory another live run is writing, and refuse to mix a new run's files with another run's
    results (the start files of a run killed before its first checkpoint do not count: see `sapo.run.outdir`)."""
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
