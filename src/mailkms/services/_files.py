"""Files the server writes beside its store (keys, certificates, CRLs, markers)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never part of one; each writer has a temporary
    file of its own (mkstemp: O_EXCL, 0600 until chmod), so two nodes renewing the same file on a
    shared data folder cannot truncate each other's half-written copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Held by one process at a time across the machine (flock on `path`, made if missing): for a
    read-number-sign-write of a file that several server processes on one data folder renew."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
