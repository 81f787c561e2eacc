"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

A write that fails part way (the disk fills, a file-size limit, the process is killed) leaves the previous
file as it was and no temporary file behind; :func:`out_of_space` tells such a failure from other
``OSError``s so a caller can answer it as one (HTTP 507 on the server).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_copy", "atomic_write_bytes", "check_writable", "out_of_space"]

# Errors of a write that did not fit: the disk or the user's quota is full, or the file-size limit is reached.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def out_of_space(err: BaseException) -> bool:
    """True for an ``OSError`` that says the data did not fit (``ENOSPC``, ``EDQUOT``, ``EFBIG``)."""
    return isinstance(err, OSError) and err.errno in _NO_SPACE


def _atomic(path: str | os.PathLike[str], fill: Callable[[BinaryIO], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the usual rw-r--r-- so other readers (a server run under another
        # account, a backup job) see it like any other written file.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is renamed over
    ``path`` (``os.replace`` is atomic on POSIX and Windows within one file system). If any step fails,
    ``path`` is as it was and the temporary file is removed.

    Args:
        path: destination file; its folder is created if missing.
        data: the file's full content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return _atomic(path, lambda f: f.write(data))


def atomic_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Copy the file ``source`` to ``path`` atomically, as :func:`atomic_write_bytes` writes (streamed, so a
    large file is never held in memory).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """

    def fill(f: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)

    return _atomic(path, fill)


def check_writable(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` if missing and prove it takes a file (write, flush to disk, remove one), so a folder
    on a read-only or full file system is refused at start, not at the first write that matters. A permission
    check (``os.access``) would not do: it says yes to root on a folder without write bits and cannot see a
    read-only mount.

    Args:
        folder: the folder.
        what: what it is, for the message (e.g. "the app's model folder").

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: if it cannot be created or written, with the reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / ".write-check", b"medmeta\n")
        (folder / ".write-check").unlink()
    except OSError as err:
        raise ValueError(
            f"{what} {folder} is not writable ({err.strerror or err}); medmeta writes there while it serves. "
            "Give it a folder on a writable disk with free space."
        ) from err
    return folder
