"""The exceptions every layer of sapo raises for problems a user can fix.

They live here, below everything else, so that the data layer, the trainer, the evaluation and plotting
commands and the CLI all raise and catch the same classes without importing one another. The CLI turns
each of them into one paragraph and an exit status instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import stat


class UsageError(ValueError):
    """A problem with what the user asked for (configuration, paths, options), reported without a traceback."""


class DataError(ValueError):
    """Bad input data; the message names where (file, line, field) and what is wrong."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed by this run (missing, incomplete, or from another model)."""


class OutputDirError(ValueError):
    """Training would overwrite results of another run."""


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (a signal, or repeated non-finite steps) after saving a checkpoint."""

    def __init__(self, message: str, checkpoint: str | None, exit_code: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


USER_ERRORS = (UsageError, DataError, CheckpointError, OutputDirError)
"""Reported by the CLI as one paragraph with exit status 2."""


def one_paragraph(error: BaseException | str, limit: int = 600) -> str:
    """A library's message on one line (some span several paragraphs, some carry terminal colour codes), shortened
    to `limit` characters."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SPECIAL_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def describe_unusable_path(path: str | os.PathLike[str]) -> str | None:
    """What stands at `path` when it is neither a regular file, a directory, nor absent: "is a named pipe (FIFO)",
    "is a symbolic link loop", "is a broken symbolic link to X", "is a character device" (such as /dev/null).
    `Path.exists()` is False for a link loop and `is_file()` for a device, so without this they all read "no such
    file or directory". None for a regular file, a directory, or nothing at all."""
    try:
        info = os.lstat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "lies under a symbolic link loop"
        return None
    if stat.S_ISLNK(info.st_mode):
        try:
            info = os.stat(path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "is a symbolic link loop"
            if error.errno == errno.ENOENT:
                return f"is a broken symbolic link (to {os.readlink(path)})"
            return f"cannot be followed ({error.strerror})"
    for test, kind in _SPECIAL_KINDS:
        if test(info.st_mode):
            return f"is {kind}"
    return None
