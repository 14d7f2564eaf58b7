"""Checkpoint files: the training-checkpoint format, ``weights_only`` loading, resume discovery.

Used by training (writing ``last.pt``, ``--resume``) and by evaluation (exporting a backbone from a
checkpoint); it depends on neither. The format is docs/design.md §9.

Layout of ``OUTPUT_DIR``: ``last.pt`` is always the newest *complete* checkpoint; the one it
replaced is kept as ``last.prev.pt`` so that a damaged ``last.pt`` (disk full, node lost while
copying) still leaves a run to resume. Every write goes through :func:`fastebm.files.atomic_write`.

A checkpoint holds only tensors, numbers, strings, bools, None, lists and dicts, so loading it
never runs pickled code.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

from .errors import CheckpointError
from .files import atomic_write

__all__ = ["FORMAT", "VERSION", "LAST", "PREVIOUS", "REQUIRED_KEYS", "atomic_torch_save",
           "save_checkpoint", "load_checkpoint", "find_resume_checkpoint"]

FORMAT = "fastebm-train-checkpoint"
VERSION = 1
LAST = "last.pt"
PREVIOUS = "last.prev.pt"
REQUIRED_KEYS = ("format", "model", "optimizer", "step", "config", "rng")


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
        foreign = _pickled_objects(path, exc)
        if foreign:
            raise CheckpointError(
                f"{path} is a PyTorch file that is not a fastebm training checkpoint (it holds pickled objects: "
                f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); give a last.pt "
                f"written by fastebm-train, whose checkpoints hold only tensors and plain values") from None
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a legacy pickle
            raise CheckpointError(f"{path} is not a PyTorch checkpoint at all (it starts with {head!r}); give a last.pt "
                                  f"written by fastebm-train") from None
        reason = " ".join(str(exc).split())[:90] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable, truncated or corrupt ({reason}...); "
            f"use an earlier checkpoint such as {PREVIOUS}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fastebm training checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is incomplete")
    return state


def _pickled_objects(path: str, exc: Exception) -> List[str]:
    """The classes/functions a file's pickle refers to, when ``weights_only`` loading refused them (else [])."""
    if not isinstance(exc, pickle.UnpicklingError):
        return []  # a damaged zip or a bad magic number: not another tool's complete file
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # older torch, or a pickle too damaged to scan: the error message names the first one
        return re.findall(r"GLOBAL ([\w.]+)", str(exc))[:1]


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
