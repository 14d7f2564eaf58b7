"""Process-group facts for the training loop: rank, world size and the main-process check.

A thin view of :mod:`fastebm.distributed` (which joins torchrun's process group, wraps the
objective in DDP/FSDP2 and names failed ranks). The loop asks these functions for every decision
that depends on the process: which slice of the global batch to load, who writes files, how
metrics and the NaN / stop verdicts are agreed on. Without torchrun they answer "one process".
"""
from __future__ import annotations

import os

import torch

from .. import distributed as _d

is_initialized = _d.is_initialized
rank = _d.rank
world_size = _d.world_size
is_main = _d.is_main
barrier = _d.barrier
all_gather_object = _d.all_gather_object


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over processes (a copy; the input is left alone)."""
    return _d.all_reduce_mean(value)


def any_true(flag: bool, device: torch.device = None) -> bool:
    """True if ``flag`` is true on any process, so that every rank takes the same branch.

    Every rank must call it at the same point (it is a collective): never short-circuit it
    behind a rank-local condition.
    """
    return _d.any_rank(flag)
