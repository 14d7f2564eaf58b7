"""Atomic file writes, shared by every command's outputs (checkpoints, summaries, tables, pictures).

A write goes to a temporary file beside the target, is flushed and fsync'ed, gets the permissions of
a normally created file (``0o666`` minus the umask; ``mkstemp`` alone would make it ``0600``), and is
renamed over the target (``os.replace`` is atomic on POSIX): a crash or a full disk leaves the old
file or the new one, never half of one. Imports nothing from fastebm but its errors.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, BinaryIO, Callable, Iterable, Optional

from .errors import OutputError

__all__ = ["atomic_write", "fsync_dir", "remove_files", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "json_safe", "new_file_mode",
           "current_umask"]


def fsync_dir(path: str) -> None:
    """Makes the renames in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_files(paths: Iterable[str], flag: str = "--overwrite") -> int:
    """Deletes ``paths`` (a missing one is skipped) for ``flag``; returns how many were deleted.
    Raises OutputError naming the first file that cannot be deleted."""
    removed = 0
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"{flag}: cannot delete {path}: {exc.strerror or exc}") from None
    return removed


def current_umask() -> int:
    """The process's umask (Linux: read from /proc, so no other thread sees a changed umask)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permission bits of a new regular file, as ``open()`` would create it: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def atomic_write(path: str, write: Callable[[BinaryIO], None], *, keep_previous: Optional[str] = None) -> str:
    """Writes a file so that ``path`` is never seen half-written, even if the process dies.

    ``write(fh)`` fills a temporary file beside ``path`` (binary mode), which is flushed, fsync'ed,
    given the mode of a normally created file (``0o666 & ~umask``, not mkstemp's ``0600``) and
    renamed over ``path``. With ``keep_previous``, an existing ``path`` is first renamed to it: if
    the process dies between the two renames, ``keep_previous`` is complete. On any exception the
    temporary file is removed and ``path`` is left as it was. Returns ``path``.

    Raises :class:`~fastebm.errors.OutputError` (an ``OSError``) naming ``path`` when the folder
    cannot be written (permissions, disk full, not a folder); other errors of ``write`` pass through.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        if isinstance(exc, RuntimeError) and "PytorchStreamWriter failed" in str(exc):  # torch.save's OSError
            raise OutputError(f"cannot write {path}: {str(exc).splitlines()[0][:200]}") from None
        raise
    fsync_dir(folder)
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    """``data`` as the whole content of ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str, text: str) -> str:
    """``text`` (UTF-8) as the whole content of ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: str, obj: Any) -> str:
    """``obj`` as indented strict JSON (non-finite floats become null; other objects through ``str``)."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False, default=str) + "\n")
