"""Crash-safe file writes: the one atomic-write helper.

A file is written under a temporary name in the same directory, flushed and fsynced, then
renamed into place (`os.replace` is atomic on POSIX), and the directory entry is fsynced too.
A reader, or a process that crashes half-way, sees the old file or the new one, never half
of either. Used for prepared corpora, job records, checkpoint manifests and LATEST pointers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], *, durable: bool = True) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it to `path`.

    `durable`: fsync the file and the directory (a power cut keeps the new file); without it
    the write is still atomic for concurrent readers, which is all a cache needs.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if durable:
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """`atomic_write` of a text file (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)
