"""Telling a full disk from other failures, whatever library met it.

A full disk does not always arrive as an `OSError` with `errno.ENOSPC`: `torch.save` writes through a C++ stream
and raises `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos ...` (or `basic_ios::clear:
iostream error`), and safetensors' Rust writer raises `SafetensorError: ... No space left on device (os error 28)`.
`disk_full_error` recognises all of them (the errno anywhere in the exception chain, the operating system's own
words in the message, or a failed torch stream write on a nearly full file system) so a checkpoint or final save
that runs out of space ends in one paragraph, never a traceback.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from sapo.errors import OutputDirError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The operating system's words (strerror) and the Rust std spelling ("os error 28") of ENOSPC and EDQUOT.
DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", f"os error {errno.ENOSPC})",
                   f"os error {errno.EDQUOT})")
# torch.save's C++ writer: a short write shows as one of these, with no errno.
TORCH_WRITE_FAILED = ("unexpected pos", "iostream error", "pytorchstreamwriter failed writing",
                      "file write failed")
NEARLY_FULL_BYTES = 64 << 20  # a torch write failure on a file system with less free is a full disk


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it was raised from or while handling, each once."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]


def free_bytes(path: Path) -> int | None:
    """Free bytes (for this user) on the file system holding `path` or its nearest existing parent."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def is_disk_full(error: BaseException, out: Path) -> tuple[bool, str | None]:
    """Whether `error` is a write that ran out of space (or quota), and the file it was writing where known."""
    for current in exception_chain(error):
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True, current.filename
    texts = [str(current).lower() for current in exception_chain(error)]
    if any(word in text for text in texts for word in DISK_FULL_WORDS):
        return True, None
    if any(isinstance(current, RuntimeError) and any(word in str(current).lower() for word in TORCH_WRITE_FAILED)
           for current in exception_chain(error)):
        free = free_bytes(out)
        return free is not None and free < NEARLY_FULL_BYTES, None
    return False, None


REFUSED_ERRNOS = {errno.EROFS: "its file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}
REFUSED_WORDS = {"read-only file system": errno.EROFS, f"os error {errno.EROFS})": errno.EROFS,
                 "permission denied": errno.EACCES, f"os error {errno.EACCES})": errno.EACCES}
TORCH_OPEN_FAILED = ("cannot be opened", "parent directory")


def refused_write(error: BaseException, out: Path) -> str | None:
    """Why the file system refused a write (read-only, permission), from an OSError's errno, a library's message
    (safetensors: "os error 30"), or a torch open failure on an output_dir that is now read-only or not writable;
    None for anything else."""
    for current in exception_chain(error):
        if isinstance(current, OSError) and current.errno in REFUSED_ERRNOS:
            return REFUSED_ERRNOS[current.errno] + (f" (writing {current.filename})" if current.filename else "")
    for current in exception_chain(error):
        text = str(current).lower()
        for word, code in REFUSED_WORDS.items():
            if word in text:
                return REFUSED_ERRNOS[code]
        if isinstance(current, RuntimeError) and any(word in text for word in TORCH_OPEN_FAILED):
            return _unwritable(out)
    return None


def _unwritable(out: Path) -> str | None:
    path = Path(out)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "its file system is read-only"
    except OSError:
        return None
    return None if os.access(path, os.W_OK | os.X_OK) else "permission denied"


def filesystem_error(error: BaseException, out: Path) -> OutputDirError | None:
    """A full disk, or a write the file system refused, as one paragraph saying what survived; None otherwise."""
    full = disk_full_error(error, out)
    if full is not None:
        return full
    reason = refused_write(error, out)
    if reason is None:
        return None
    return OutputDirError(f"cannot write into output_dir {out}: {reason}. What was written completely is intact: "
                          "every checkpoint-N present is whole and the final outputs are published only once "
                          "complete. Make the directory writable, then continue with --resume_from_checkpoint true")


def disk_full_error(error: BaseException, out: Path) -> OutputDirError | None:
    """A full disk or exhausted quota as a one-paragraph error saying what survived; None for other errors."""
    full, filename = is_disk_full(error, out)
    if not full:
        return None
    where = f" (writing {filename})" if filename else ""
    return OutputDirError(f"no space left on the device of output_dir {out}{where}. What was written completely is "
                          "intact: every checkpoint-N present is whole (the one being written was dropped), the final "
                          "outputs are published only once complete, and metrics.jsonl at most ends in a torn line, "
                          "which a resumed run drops. Free space, then continue with --resume_from_checkpoint true")
