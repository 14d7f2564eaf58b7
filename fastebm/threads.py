"""CPU threads of a training process: how many, and how idle OpenMP threads wait.

PyTorch's CPU kernels run on an OpenMP team (GNU libgomp in the official wheels) of
``torch.get_num_threads()`` threads, by default one per core. Two defaults of that runtime make a
shared machine slow (docs/training.md, "Threads", has the measurements):

* every process takes every core: two runs on one machine, or ``torchrun --nproc_per_node N``
  ranks on one CPU node, ask for N times more threads than there are cores;
* an OpenMP thread that runs out of work spins before it sleeps (libgomp: 300,000 iterations
  unless ``OMP_WAIT_POLICY`` says otherwise), so a thread whose partner was descheduled burns the
  core that partner needs, and each run slows the other down many times over.

:func:`resolve_threads` picks the count (``--threads``, else ``OMP_NUM_THREADS``, else usable cores
// processes on this node) and :func:`configure_threads` applies it. The wait policy is read once,
when torch loads libgomp, so it can only come from the environment before ``import torch``:
:func:`prefer_passive_wait` sets ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once) unless
the user set a policy; ``fastebm/__init__.py`` calls it first thing, for the training command only.

This module imports nothing heavy at import time (torch only inside :func:`configure_threads`).
"""
from __future__ import annotations

import logging
import math
import os
import sys
from typing import Mapping, Optional, Tuple

log = logging.getLogger(__name__)

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
THREADS_ENV = "OMP_NUM_THREADS"


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 limit readable: the affinity mask is the answer
        pass
    return max(1, cores)


def _set_by_torchrun(env: Mapping[str, str]) -> bool:
    """True when OMP_NUM_THREADS=1 came from torchrun's default, not from the user.

    torchrun sets OMP_NUM_THREADS=1 for its workers when it is unset and there is more than one
    process per node (torch/distributed/run.py). It sets it in its own process at run time, so the
    variable is missing from the environment torchrun itself was started with, which Linux keeps in
    /proc/PARENT/environ. Anything unreadable counts as the user's setting.
    """
    if env.get(THREADS_ENV) != "1" or "TORCHELASTIC_RUN_ID" not in env:
        return False
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as fh:
            parent = fh.read().split(b"\0")
    except OSError:
        return False
    return not any(item.startswith(THREADS_ENV.encode() + b"=") for item in parent)


def resolve_threads(requested: Optional[int], local_world_size: int = 1,
                    env: Optional[Mapping[str, str]] = None) -> Tuple[Optional[int], str]:
    """(threads, why): ``requested`` (--threads) if given; else None when the user's OMP_NUM_THREADS
    should stand (torch already follows it); else usable cores // processes on this node (>= 1).

    ``local_world_size``: processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE).
    torchrun's own OMP_NUM_THREADS=1 default is not the user's choice and is replaced.
    """
    env = os.environ if env is None else env
    if requested is not None:
        return requested, "--threads"
    if env.get(THREADS_ENV, "").strip() and not _set_by_torchrun(env):
        return None, f"{THREADS_ENV}={env[THREADS_ENV]}"
    cores, procs = usable_cores(), max(1, local_world_size)
    return max(1, cores // procs), f"auto: {cores} usable core(s) // {procs} process(es) on this node"


def configure_threads(requested: Optional[int], local_world_size: int = 1) -> int:
    """Sets torch's intra-op thread count as :func:`resolve_threads` decides; returns the count in use."""
    import torch

    threads, why = resolve_threads(requested, local_world_size)
    if threads is not None:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    log.info(f"CPU threads: {n} per process ({why}; OpenMP wait policy "
             f"{os.environ.get(WAIT_POLICY_ENV, 'default (spin, then sleep)')})")
    return n


def is_training_command(argv=None) -> bool:
    """True when this process runs ``fastebm-train`` or ``python -m fastebm train`` (also under torchrun)."""
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    if any(os.path.basename(a) == "fastebm-train" for a in argv[:3]):
        return True
    for i, a in enumerate(argv[:-1]):
        if a == "-m":
            module = argv[i + 1]
            return module == "fastebm.cli.train" or (module == "fastebm" and argv[i + 2:i + 3] == ["train"])
    return False


def prefer_passive_wait(argv=None, env=None) -> bool:
    """Sets OMP_WAIT_POLICY=PASSIVE for the training command unless the user chose a policy.

    Effective only before torch is imported (libgomp reads the variable when it loads); returns
    True if it set the variable. Library users (``import fastebm``) are left alone.
    """
    env = os.environ if env is None else env
    if WAIT_POLICY_ENV in env or "torch" in sys.modules or not is_training_command(argv):
        return False
    env[WAIT_POLICY_ENV] = "PASSIVE"
    return True
