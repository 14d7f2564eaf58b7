"""Joining and leaving torchrun's process group: device, backend, bounded collective timeout.

One process per device. ``torchrun`` (or SLURM's ``srun`` running ``torchrun``) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them, picks the device of the local rank and the backend (NCCL on
CUDA, gloo on CPU) and sets a bounded collective timeout so that a dead or hung peer fails the
job instead of hanging it. Without those variables it returns a one-process :class:`DistInfo`.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
from typing import Optional

import torch
import torch.distributed as tdist

from ..errors import DistributedSetupError
from .liveness import heartbeat, start_liveness, stop_liveness
from .process import DistInfo, is_initialized, launched_by_torchrun

BACKENDS = ("auto", "nccl", "gloo")
# Collective timeouts. Long enough for rank 0 to write a large checkpoint while the others wait
# at the barrier after it; short enough that a dead or hung peer ends the job in minutes, not hours.
DEFAULT_TIMEOUT_S = {"gloo": 120.0, "nccl": 300.0}


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={text!r} is not an integer; "
                                    f"launch with torchrun, which sets it") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    """``--device`` -> the device of this process (``cuda`` = the local rank's GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"--device {device}: no CUDA GPU is visible; use --device cpu (gloo) or auto")
        count = torch.cuda.device_count()
        if ":" in device:  # one explicit device for every rank only makes sense with one rank per node
            if torch.device(device).index >= count:
                raise DistributedSetupError(f"--device {device}: only {count} GPU(s) visible")
            return torch.device(device)
        if local_rank >= count:
            raise DistributedSetupError(
                f"LOCAL_RANK {local_rank} has no GPU: only {count} visible on this node; "
                f"use torchrun --nproc_per_node {count} (or fewer)")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise DistributedSetupError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def _init_process_group(backend: str, rank: int, world: int, timeout: float, dev: torch.device) -> None:
    kw = {"device_id": dev} if backend == "nccl" else {}
    td = datetime.timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in os.environ:
        # torchrun's agent keeps ONE store across --max_restarts attempts, and the process group's
        # keys (each rank's listening address) are not namespaced by attempt: a restarted rank can
        # read a dead predecessor's address and fail with "connectFullMesh ... Connection refused"
        # (seen on torch 2.14 with gloo). A per-attempt prefix keeps every attempt's keys apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=td)
        store = tdist.PrefixStore(f"fastebm/attempt_{attempt}/", base)
        tdist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=td, **kw)
    else:
        tdist.init_process_group(backend=backend, timeout=td, **kw)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: Optional[float] = None) -> DistInfo:
    """Joins the process group described by torchrun's environment variables.

    Args:
        device: ``auto`` (the local rank's GPU if CUDA is available, else CPU), ``cpu``, ``cuda``,
            ``cuda:N``. A CUDA device becomes the current device.
        backend: ``auto`` (NCCL for CUDA devices, gloo for CPU), ``nccl`` or ``gloo``.
        timeout_s: collective timeout in seconds (default :data:`DEFAULT_TIMEOUT_S` per backend):
            a collective that waits longer for a peer raises instead of hanging.

    Without torchrun's variables returns a single-process :class:`DistInfo` (no process group).
    Calling it again after success returns the current state. Raises
    :class:`~fastebm.errors.DistributedSetupError` for an unusable environment, device or backend.
    """
    if backend not in BACKENDS:
        raise DistributedSetupError(f"--dist_backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if timeout_s is not None and not timeout_s > 0:
        raise DistributedSetupError(f"--dist_timeout must be > 0 seconds, got {timeout_s!r}")
    if not launched_by_torchrun():
        dev = _pick_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world
    if not (0 <= rank < world) or not (0 <= local_rank < local_world):
        raise DistributedSetupError(f"inconsistent launch: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank}")
    dev = _pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise DistributedSetupError("--dist_backend nccl needs CUDA devices; use gloo on CPU")
    timeout = float(timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S[backend])
    if is_initialized():
        return DistInfo(rank, world, local_rank, local_world, tdist.get_backend(), dev, timeout)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # Abort the communicator and end the process when a collective times out or a peer
        # fails, instead of leaving the survivors blocked inside a CUDA kernel.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # A worker that dies in native code (SIGABRT, SIGSEGV) prints every thread's Python stack to its
    # stderr, which torchrun collects: the one clue such crashes leave (torchrun only reports the signal).
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    _init_process_group(backend, rank, world, timeout, dev)
    start_liveness()
    heartbeat(0)
    return DistInfo(rank, world, local_rank, local_world, backend, dev, timeout)


def destroy_distributed() -> None:
    """Leaves the process group (safe to call when none exists)."""
    stop_liveness()
    if is_initialized():
        tdist.destroy_process_group()
