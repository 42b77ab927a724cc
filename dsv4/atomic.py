"""Atomic writes: a reader (or a run killed half-way) sees the old file or the new one, never half of one.

Everything is written next to its destination (same file system) and moved into place with `os.replace`:
    atomic_path(path)          a temporary path to hand to a library that writes files itself (savefig, safetensors)
    atomic_write(path, write)  write(f) into a binary file object
    atomic_dir(path)           a temporary directory that replaces `path` as a whole (snapshots, checkpoints)
Every writer of the project that leaves a file behind (token files, tokenizers, plots, metrics, reports, snapshots,
the final checkpoint) goes through these.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same suffix, so libraries that look at it pick the same format); once
    the block ends without an error it replaces `path`, else it is removed."""
    path = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.",
                               suffix=f".tmp{os.path.splitext(path)[1]}")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a binary file that becomes `path` once it has been written and flushed to disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 string."""
    atomic_write(path, lambda f: f.write(text.encode()))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary directory beside `path`; once the block ends without an error it replaces `path` (an
    older directory there is removed first), else it is removed."""
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
