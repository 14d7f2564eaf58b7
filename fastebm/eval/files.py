"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``.

A crash (or a full disk) leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Calls ``write(tmp_path)`` and renames the result over ``path``; the temporary file never survives."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str, obj: Any) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
