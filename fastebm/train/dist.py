"""Process-group facts for the training loop: rank, world size and the main-process check.

Single-process defaults today. The distributed engine (torchrun + DDP) only has to make these
functions answer from ``torch.distributed``; the loop already asks them for every decision
that depends on the process (which slice of the global batch to load, who writes files, how
metrics and the NaN verdict are agreed on).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """True on the one process that logs, draws pictures and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over processes (a copy; the input is left alone)."""
    out = value.detach().clone()
    if is_initialized():
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        out /= world_size()
    return out


def any_true(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any process, so that every rank takes the same branch."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)
