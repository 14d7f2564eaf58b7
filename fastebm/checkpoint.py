"""Checkpoint files: atomic writes, the training-checkpoint format, ``weights_only`` loading, resume discovery.

Used by training (writing ``last.pt``, ``--resume``) and by evaluation (exporting a backbone from a
checkpoint); it depends on neither. The format is docs/design.md §9.

Layout of ``OUTPUT_DIR``: ``last.pt`` is always the newest *complete* checkpoint; the one it
replaced is kept as ``last.prev.pt`` so that a damaged ``last.pt`` (disk full, node lost while
copying) still leaves a run to resume. Every write goes to a temporary file in the same folder, is
flushed and fsync'ed, and only then renamed over the old name (``os.replace`` is atomic on POSIX).

A checkpoint holds only tensors, numbers, strings, bools, None, lists and dicts, so loading it
never runs pickled code.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple

import torch

from .errors import CheckpointError

__all__ = ["FORMAT", "VERSION", "LAST", "PREVIOUS", "REQUIRED_KEYS", "atomic_write", "atomic_torch_save",
           "save_checkpoint", "load_checkpoint", "find_resume_checkpoint"]

FORMAT = "fastebm-train-checkpoint"
VERSION = 1
LAST = "last.pt"
PREVIOUS = "last.prev.pt"
REQUIRED_KEYS = ("format", "model", "optimizer", "step", "config", "rng")


def _fsync_dir(path: str) -> None:
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


def atomic_write(path: str, write: Callable[[BinaryIO], None], *, keep_previous: Optional[str] = None) -> str:
    """Writes a file so that ``path`` is never seen half-written, even if the process dies.

    ``write(fh)`` fills a temporary file beside ``path`` (binary mode), which is flushed, fsync'ed
    and renamed over ``path``. With ``keep_previous``, an existing ``path`` is first renamed to it:
    if the process dies between the two renames, ``keep_previous`` is complete. On any exception the
    temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return path


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(state: Dict[str, Any], output_dir: str) -> str:
    """Writes ``state`` (plus the format marker) as OUTPUT_DIR/last.pt, keeping the previous one as last.prev.pt."""
    state = dict(state, format=FORMAT, version=VERSION)
    return atomic_write(os.path.join(output_dir, LAST), lambda fh: torch.save(state, fh),
                        keep_previous=os.path.join(output_dir, PREVIOUS))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Loads and sanity-checks a training checkpoint; CheckpointError names the file and the problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad magic, unpickling refused ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {reason[:160]}); "
            f"use an earlier checkpoint such as {PREVIOUS}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fastebm training checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is incomplete")
    return state


def find_resume_checkpoint(output_dir: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """For ``--resume auto``: the newest loadable checkpoint of OUTPUT_DIR, or (None, None).

    Falls back from last.pt to last.prev.pt with a warning when last.pt is damaged; raises
    CheckpointError when checkpoints exist but none loads.
    """
    errors = []
    for name in (LAST, PREVIOUS):
        path = os.path.join(output_dir, name)
        if not os.path.exists(path):
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            warnings.warn(f"{exc}; trying the previous checkpoint", stacklevel=2)
            continue
        if errors:
            warnings.warn(f"resuming from the fallback checkpoint {path} (step {state['step']})", stacklevel=2)
        return state, path
    if errors:
        raise CheckpointError("no usable checkpoint in " + output_dir + ": " + " | ".join(errors))
    return None, None
