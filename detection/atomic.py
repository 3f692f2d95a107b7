"""Atomic file writes: readers (and a crash mid-write) see the old file or the complete new one.

Every file the project writes that a reader or a later run relies on (metrics, reports, results,
checkpoints, cached weights, server zips, generated annotations) goes through :func:`atomic_path`:
the content is written to a temporary file in the same folder (so the final ``os.replace`` is a
rename on one file system), flushed, given the permissions a plain ``open()`` would have, and then
renamed over the target. On any exception the temporary file is removed and the old file stays.
Plain Python on purpose: the model code, the data generators and the training layer all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it replaces ``path`` (``replace=False``:
    removed instead, for ranks that must not write), on an exception it is removed and ``path`` kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not replace:
            tmp.unlink(missing_ok=True)
            return
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, **json_kwargs: Any) -> Path:
    """Serialise ``obj`` to ``path`` atomically (extra keyword arguments go to ``json.dump``); returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **json_kwargs)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)
