"""Cross-rank agreement: barrier, means, the any-rank vote, gathering small objects.

Each is a collective when a process group exists (every rank must call it at the same point;
never put one behind a rank-local condition) and the identity for a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

from .process import collective_device, is_initialized, world_size


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_mean(value) -> torch.Tensor:
    """Mean over ranks of a tensor or number (a new tensor on the input's device; input untouched)."""
    t = torch.as_tensor(value).detach().clone()
    if not is_initialized():
        return t
    home = t.device
    work = t.to(collective_device(), torch.float64 if t.dtype == torch.float64 else torch.float32)
    tdist.all_reduce(work, op=tdist.ReduceOp.SUM)
    return (work / world_size()).to(home)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank: all ranks take the same branch.

    Used for the stop request (SIGTERM reaches one rank -> every rank saves at the same step) and
    the non-finite-loss verdict.
    """
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small plain objects only)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out
