"""Where this process sits in the job: rank, world size, the main process.

Every question has a one-process answer (rank 0 of 1) when no process group exists, so callers
ask the same way with or without ``torchrun``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as tdist

# Rendezvous variables that torchrun (or srun exporting them) sets for every worker.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (what :func:`fastebm.distributed.init_distributed` found)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None  # None: no process group (single process)
    device: torch.device = torch.device("cpu")
    timeout_s: Optional[float] = None

    @property
    def is_main(self) -> bool:
        """The one process that logs, draws pictures and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True when the launcher set the rendezvous variables (torchrun, or srun exporting them)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE")) and "LOCAL_RANK" in os.environ


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def collective_device() -> torch.device:
    """Where the tensors of a collective must live: the current GPU under NCCL, else the CPU."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
