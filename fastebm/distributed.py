"""Multi-process training on ``torchrun``: process group, DDP/FSDP2 wrapping, cross-rank agreement.

One process per device. ``torchrun`` (or SLURM's ``srun`` running ``torchrun``) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them, picks the device of the local rank and the backend (NCCL on
CUDA, gloo on CPU) and sets a bounded collective timeout so that a dead or hung peer fails the
job instead of hanging it. Without those variables everything here degrades to one process.

What is wrapped: the whole :class:`~fastebm.RestorationObjective` (all T restoration steps and the
loss are one ``forward``), so DDP sees exactly one forward per backward (DESIGN.md §8). The inner
``torch.autograd.grad(E, x, create_graph=True)`` of every step only asks for the input gradient:
it does not run the parameters' gradient-accumulation nodes, so DDP's reducer hooks fire only in
the final ``loss.backward()``. Two DDP settings follow from the double backward:

* ``find_unused_parameters=True``: a parameter whose effect on ``E`` does not depend on the input
  receives no gradient through ``dE/dx`` -- the final ``norm`` under the default pre-norm
  ``sqnorm`` energy (it is not used at all), the bias of the ``linear`` energy head (it shifts
  ``E`` by a constant). Without the flag DDP waits for their gradients forever and the second
  iteration raises "Expected to have finished reduction in the prior iteration".
* gradients are averaged over ranks; the objective's loss is a per-sample mean
  (:func:`fastebm.restore.weighted_mse`), so with equal per-rank batches N ranks x B give the
  gradient of one process with N*B samples.

FSDP2 (``--fsdp``): see :data:`FSDP_STATUS` (what works with the double backward and why per-block
sharding does not).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as tdist
import torch.nn as nn

from .errors import DistributedSetupError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("auto", "nccl", "gloo")
# Collective timeouts. Long enough for rank 0 to write a large checkpoint while the others wait
# at the barrier after it; short enough that a dead or hung peer ends the job in minutes, not hours.
DEFAULT_TIMEOUT_S = {"gloo": 120.0, "nccl": 300.0}
_HEARTBEAT_PREFIX = "fastebm/heartbeat/"

FSDP_SUMMARY = ("whole RestorationObjective sharded as one FSDP2 unit (parameters, gradients and optimiser state "
                "sharded between iterations); per-block sharding is wrong with the restoration double backward, "
                "see docs/distributed.md")
FSDP_STATUS = (
    "--fsdp shards the whole RestorationObjective as ONE FSDP2 unit (fully_shard on the objective): "
    "parameters, gradients and AdamW state are sharded across ranks between iterations, and the full "
    "parameter set is gathered once per iteration for the T restoration steps and the double backward. "
    "Per-block sharding (fully_shard on each ViT block) is not used because it is wrong with the "
    "double backward: FSDP2 runs its per-module post-backward hooks (reduce-scatter, reshard) already "
    "in the inner torch.autograd.grad(E, x, create_graph=True) of each restoration step. Found on "
    "torch 2.14 with gloo: (a) the blocks' resharding frees the unsharded weights that the outer "
    "backward through dE/dx still needs ('The tensor has a non-zero number of elements, but its data "
    "is not allocated yet'); (b) with reshard_after_backward disabled the outer backward silently "
    "produces NO gradient for the blocks (their post-backward already ran); (c) with the objective "
    "as root, the root's end-of-backward callback reshards the embedding mid-forward ('got mixed "
    "torch.Tensor and DTensor'). So --fsdp saves the gradient and optimiser-state memory "
    "(~12 bytes/parameter with fp32 AdamW, divided by the world size) but not the activation or "
    "gathered-weight memory of the step."
)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

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


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={text!r} is not an integer; "
                                    f"launch with torchrun, which sets it") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"--device {device}: no CUDA GPU is visible; use --device cpu (gloo) or auto")
        if ":" in device:  # one explicit device for every rank only makes sense with one rank per node
            return torch.device(device)
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedSetupError(
                f"LOCAL_RANK {local_rank} has no GPU: only {count} visible on this node; "
                f"use torchrun --nproc_per_node {count} (or fewer)")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise DistributedSetupError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: Optional[float] = None) -> DistInfo:
    """Joins the process group described by torchrun's environment variables.

    Args:
        device: ``auto`` (the local rank's GPU if CUDA is available, else CPU), ``cpu``, ``cuda``.
        backend: ``auto`` (NCCL for CUDA devices, gloo for CPU), ``nccl`` or ``gloo``.
        timeout_s: collective timeout in seconds (default :data:`DEFAULT_TIMEOUT_S` per backend):
            a collective that waits longer for a peer raises instead of hanging.

    Without torchrun's variables returns a single-process :class:`DistInfo` (no process group).
    Calling it again after success returns the current state.
    """
    if backend not in BACKENDS:
        raise DistributedSetupError(f"--dist_backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if timeout_s is not None and not timeout_s > 0:
        raise DistributedSetupError(f"--dist_timeout must be > 0 seconds, got {timeout_s!r}")
    if not launched_by_torchrun():
        return DistInfo(device=_pick_device(device, 0))
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
    info = DistInfo(rank, world, local_rank, local_world, backend, dev, timeout)
    _start_liveness()
    heartbeat(0)
    return info


def destroy_distributed() -> None:
    """Leaves the process group (safe to call when none exists)."""
    _stop_liveness()
    if is_initialized():
        tdist.destroy_process_group()


# ---------------------------------------------------------------------- facts and agreement
def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _collective_device() -> torch.device:
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_mean(value) -> torch.Tensor:
    """Mean over ranks of a tensor or number (a new tensor on the input's device; input untouched)."""
    t = torch.as_tensor(value).detach().clone()
    if not is_initialized():
        return t
    home = t.device
    work = t.to(_collective_device(), torch.float64 if t.dtype == torch.float64 else torch.float32)
    tdist.all_reduce(work, op=tdist.ReduceOp.SUM)
    return (work / world_size()).to(home)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank: all ranks take the same branch.

    Used for the stop request (SIGTERM reaches one rank -> every rank saves at the same step) and
    the non-finite-loss verdict.
    """
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled; only for small plain objects)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small plain objects only)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------- naming a failed rank
# Two records per rank in the rendezvous store: the step it last finished (written by the training
# loop) and a liveness stamp refreshed by a background thread every LIVENESS_INTERVAL_S. A rank
# blocked in a collective keeps its stamp fresh (the thread runs while the main thread waits in
# C++); a killed, stopped or frozen process does not. So the rank that notices a failure can name
# the rank that caused it, which torchrun's summary cannot do for a hang (it names the rank whose
# collective timed out first).
LIVENESS_INTERVAL_S = 2.0
_liveness = None


def _key(kind: str, r: int) -> str:
    return f"{_HEARTBEAT_PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{r}"


def _open_store(timeout_s: float = 30.0):
    """A new client connection to the rendezvous store (MASTER_ADDR:MASTER_PORT), or None."""
    try:
        return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # no launcher store reachable: failure messages will just say less
        return None


class _Liveness:
    """Daemon thread: refreshes this rank's liveness stamp through its own store connection."""

    def __init__(self, store, interval_s: float):
        import threading

        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.rank = rank()
        self.store = store
        self.thread = threading.Thread(target=self._run, name="fastebm-liveness", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.store.set(_key("alive", self.rank), f"{time.time():.3f}")
            except Exception:  # store gone (job ending): nothing left to report to
                return
            self.stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


_main_store = None  # the main thread's own connection (heartbeats, failure reports)


def _start_liveness() -> None:
    global _liveness, _main_store
    if _liveness is None:
        thread_store, _main_store = _open_store(), _open_store()
        if thread_store is not None:
            _liveness = _Liveness(thread_store, LIVENESS_INTERVAL_S)


def _stop_liveness() -> None:
    global _liveness, _main_store
    if _liveness is not None:
        _liveness.stop()
        _liveness = None
    _main_store = None


def _store():
    return _main_store if is_initialized() else None


def heartbeat(step: int) -> None:
    """Records in the rendezvous store that this rank finished ``step`` (cheap; once per step)."""
    store = _store()
    if store is None:
        return
    try:
        store.set(_key("step", rank()), str(int(step)))
    except Exception:  # the store itself may be gone when the job is ending
        pass


def describe_peers(timeout_s: float = 5.0) -> str:
    """One line naming the ranks that stopped (no liveness) or fell behind (step), for failure messages."""
    store = _store()
    if store is None:
        return ""
    try:
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
    except Exception:
        pass

    def read(kind: str, r: int):
        try:
            return float(store.get(_key(kind, r)).decode())
        except Exception:
            return None

    now, me = time.time(), rank()
    alive = {r: read("alive", r) for r in range(world_size())}
    steps = {r: read("step", r) for r in range(world_size())}
    stale_after = 3 * LIVENESS_INTERVAL_S + 2
    silent = [r for r, t in alive.items() if r != me and t is not None and now - t > stale_after]
    parts = [f"rank {r} has shown no sign of life for {now - alive[r]:.0f} s (killed, stopped or frozen)" for r in silent]
    known = {r: s for r, s in steps.items() if s is not None}
    if known:
        best = max(known.values())
        behind = [r for r, s in known.items() if s < best and r not in silent]
        parts += [f"rank {r} is behind at step {int(known[r])} (others reached {int(best)})" for r in behind]
    if not parts:
        return ("no other rank looks stopped or behind from here: a peer may have just exited "
                "(torchrun's summary names the rank that failed first) or the network failed")
    return "; ".join(parts)


def explain_failure(exc: BaseException) -> str:
    """A one-paragraph message for a collective that failed (peer died, hung, or the network broke)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    peers = ""
    try:
        peers = describe_peers()
    except Exception:
        pass
    where = f"rank {rank()} of {world_size()}"
    text = f"{where}: a collective operation failed ({type(exc).__name__}: {first})"
    if peers:
        text += f"; {peers}"
    return text + ". The job stops; restart it with --resume auto (torchrun --max_restarts K does so automatically)."


def is_collective_failure(exc: BaseException) -> bool:
    """Heuristic: does ``exc`` come from a broken or timed-out collective?"""
    dist_error = getattr(tdist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                            "NCCL", "gloo", "Gloo", "Broken pipe", "ProcessGroup"))


# ---------------------------------------------------------------------- wrapping the objective
def wrap_ddp(objective: nn.Module, device: torch.device, *, find_unused_parameters: bool = True,
             static_graph: bool = False, bucket_cap_mb: Optional[float] = None) -> nn.Module:
    """``DistributedDataParallel`` around the whole restoration objective (see the module docstring).

    ``find_unused_parameters`` must stay True for the shipped energies (some parameters get no
    gradient through ``dE/dx``); ``static_graph=True`` is an alternative that records the used
    set in the first iteration instead of searching the graph every iteration.
    """
    if not is_initialized():
        raise DistributedSetupError("wrap_ddp needs an initialised process group (launch with torchrun)")
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {"find_unused_parameters": find_unused_parameters and not static_graph, "static_graph": static_graph}
    if bucket_cap_mb is not None:
        kw["bucket_cap_mb"] = bucket_cap_mb
    if device.type == "cuda":
        kw.update(device_ids=[device.index], output_device=device.index)
    return DDP(objective, **kw)


def shard_fsdp(objective: nn.Module, device: torch.device, *, per_block: bool = False) -> nn.Module:
    """FSDP2 around the whole restoration objective (in place; returns it). See :data:`FSDP_STATUS`.

    ``per_block=True`` is refused with the reason: it is wrong with the double backward.
    """
    if per_block:
        raise DistributedSetupError("per-block FSDP2 sharding is not supported with the restoration double "
                                    "backward: " + FSDP_STATUS)
    if not is_initialized():
        raise DistributedSetupError("--fsdp needs an initialised process group (launch with torchrun)")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept it in the composable namespace
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size(),))
    fully_shard(objective, mesh=mesh, reshard_after_forward=True)
    return objective


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The objective inside a DDP wrapper (FSDP2 shards in place, so it is its own objective)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skips the gradient all-reduce for non-final accumulation micro-steps (``sync=False``).

    DDP: ``module.no_sync()``; FSDP2: ``set_requires_gradient_sync(False)`` for the duration;
    plain modules: nothing. The final micro-step (``sync=True``) reduces the accumulated sum.
    """
    if sync:
        yield
        return
    if hasattr(module, "no_sync") and type(module).__name__ == "DistributedDataParallel":
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


def full_state_dict(module: nn.Module) -> dict:
    """A plain (unsharded, CPU) state dict of an FSDP2 module; collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimiser state of an FSDP2 module (keys are parameter names); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(module: nn.Module, optimizer: Optional[torch.optim.Optimizer], model_sd: dict,
                          optim_sd: Optional[dict]) -> None:
    """Loads full (unsharded) state dicts into an FSDP2 module and its optimiser; collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(module, model_sd, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optim_sd is not None:
        # strict=False: parameters that never received a gradient (the final norm under the
        # pre-norm energy) have no optimiser state, exactly as in an unsharded AdamW.
        set_optimizer_state_dict(module, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))


# ---------------------------------------------------------------------- FSDP2 checkpoints in the plain format
def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` holds FSDP2-sharded (DTensor) parameters."""
    try:
        return is_fsdp(module)
    except ImportError:
        return False


def optimizer_state_by_index(named_sd: dict) -> dict:
    """Optimiser state keyed by parameter names (FSDP2's full format) -> torch's usual index format.

    Indices count the parameters across the parameter groups in order, as ``optimizer.state_dict()``
    does, so an FSDP2 run writes the same checkpoint as a DDP or single-process run.
    """
    index, groups = {}, []
    for group in named_sd["param_groups"]:
        g = dict(group)
        g["params"] = []
        for name in group["params"]:
            index[name] = len(index)
            g["params"].append(index[name])
        groups.append(g)
    return {"state": {index[n]: v for n, v in named_sd["state"].items() if n in index}, "param_groups": groups}


def optimizer_state_by_name(indexed_sd: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`optimizer_state_by_index` for ``optimizer`` over ``module``'s parameters."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups, k = [], 0
    for group in indexed_sd["param_groups"]:
        g = dict(group)
        g["params"] = [order[i] for i in group["params"]]
        groups.append(g)
        k += len(group["params"])
    if k != len(order):
        raise ValueError(f"optimiser state has {k} parameters, the model {len(order)}")
    return {"state": {order[int(i)]: v for i, v in indexed_sd["state"].items()}, "param_groups": groups}


def gather_for_checkpoint(module: nn.Module, optimizer: torch.optim.Optimizer):
    """(model state dict, optimiser state dict) in the plain format; collective under FSDP2.

    Unsharded modules return their own state dicts on every rank. FSDP2 modules gather full tensors
    to CPU: every rank must call it; rank 0 gets the state (other ranks may get empty dicts).
    """
    if not is_sharded(module):
        return module.state_dict(), optimizer.state_dict()
    model_sd = full_state_dict(module)
    optim_sd = full_optimizer_state_dict(module, optimizer)
    return model_sd, (optimizer_state_by_index(optim_sd) if optim_sd.get("param_groups") else optim_sd)


def load_from_checkpoint(module: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Loads plain-format state dicts into ``module``/``optimizer`` (FSDP2-sharded or not)."""
    if not is_sharded(module):
        module.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    load_full_state_dicts(module, optimizer, model_sd, optimizer_state_by_name(optim_sd, module, optimizer))
