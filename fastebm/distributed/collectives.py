"""Cross-rank agreement: barrier, means, the any-rank vote (host or device), gathering small objects.

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


def any_rank_flags(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise "true on any rank" of a bool tensor, left on its device: nothing is read to the host.

    The device-side :func:`any_rank`, for verdicts that the host reads later or never (the training
    loop's skip verdict of a step, one all-reduce per optimiser step). One all-reduce (MAX) for the
    whole tensor, so several flags cost one collective; under NCCL it is queued on the GPU like any
    kernel (with gloo, a CUDA tensor's copy to the CPU does wait for the GPU). Returns a new bool
    tensor on ``flags``' device; without a process group, ``flags`` itself.
    """
    if not is_initialized():
        return flags
    work = flags.to(collective_device(), torch.int32)
    tdist.all_reduce(work, op=tdist.ReduceOp.MAX)
    return work.to(flags.device).bool()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small plain objects only)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out
