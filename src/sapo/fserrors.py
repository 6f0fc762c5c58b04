"""Old import path, kept for one release: now `sapo.run.fserrors`."""

from __future__ import annotations

from sapo.run.fserrors import (  # noqa: F401
    DISK_FULL_ERRNOS,
    DISK_FULL_WORDS,
    NEARLY_FULL_BYTES,
    REFUSED_ERRNOS,
    REFUSED_WORDS,
    TORCH_OPEN_FAILED,
    TORCH_WRITE_FAILED,
    disk_full_error,
    exception_chain,
    filesystem_error,
    free_bytes,
    is_disk_full,
    refused_write,
)
