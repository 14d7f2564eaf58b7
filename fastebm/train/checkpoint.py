"""Training checkpoints: plain dicts, written atomically, loaded with ``weights_only=True``.

Layout of ``OUTPUT_DIR``: ``last.pt`` is always the newest *complete* checkpoint; the one it
replaced is kept as ``last.prev.pt`` so that a damaged ``last.pt`` (disk full, node lost while
copying) still leaves a run to resume. A write goes to a temporary file in the same folder, is
flushed and fsync'ed, and only then renamed over the old name (``os.replace`` is atomic on POSIX).

A checkpoint holds only tensors, numbers, strings, bools, None, lists and dicts, so loading it
never runs pickled code.
"""
from __future__ import annotations

import os
import random
import tempfile
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import CheckpointError

FORMAT = "fastebm-train-checkpoint"
VERSION = 1
LAST = "last.pt"
PREVIOUS = "last.prev.pt"
REQUIRED_KEYS = ("format", "model", "optimizer", "step", "config", "rng")


def _fsync_dir(path: str) -> None:
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


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temp file beside ``path``, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def save_checkpoint(state: Dict[str, Any], output_dir: str) -> str:
    """Writes ``state`` as OUTPUT_DIR/last.pt, keeping the previous one as last.prev.pt."""
    state = dict(state, format=FORMAT, version=VERSION)
    last = os.path.join(output_dir, LAST)
    folder = os.path.abspath(output_dir)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # The old last.pt becomes last.prev.pt, then the new one takes its name. If the process
        # dies between the two renames, last.prev.pt is complete and `--resume auto` uses it.
        if os.path.exists(last):
            os.replace(last, os.path.join(output_dir, PREVIOUS))
        os.replace(tmp, last)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return last


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


# ----------------------------------------------------------------------------- RNG streams

def capture_rng_state() -> Dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states as plain data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
