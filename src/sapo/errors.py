"""The exceptions every layer of sapo raises for problems a user can fix.

They live here, below everything else, so that the data layer, the trainer, the evaluation and plotting
commands and the CLI all raise and catch the same classes without importing one another. The CLI turns
each of them into one paragraph and an exit status instead of a traceback.
"""

from __future__ import annotations


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
