"""Atomic file writes: a failure never leaves a half-written file behind.

Everything is written to a temporary file in the destination's directory and
renamed over the destination (``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shared.errors import UsageError

__all__ = ["atomic_path", "atomic_write_json", "atomic_write_text", "check_output_file",
           "ensure_writable_dir"]


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` if needed; UsageError (one line) if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot create it ({exc.strerror or exc})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: not a writable directory")
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """UsageError (one line) unless ``path`` can be written as a file; its directory is made."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a directory, expected a file path")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), f"{what} directory")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``."""
    path = Path(path)
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), "directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
