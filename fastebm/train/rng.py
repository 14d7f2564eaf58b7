"""The training run's random streams: seeding, capture/restore for checkpoints, side computations.

Resuming is exact (docs/design.md §9) because every stream the loop draws from -- torch (CPU and
CUDA), numpy and python -- is saved with the checkpoint as plain data and restored on resume, and
work that is not part of training (pictures, evaluation, building an unsharded copy) runs under
:func:`side_rng` so it does not move those streams.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def side_rng(device: torch.device):
    """Runs pictures/evaluation without moving the training RNG streams (resume stays exact)."""
    devices = [device] if device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


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
    """The inverse of :func:`capture_rng_state` (CUDA streams only when the device count matches)."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
