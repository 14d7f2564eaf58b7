"""Wrapping the restoration objective: DDP, FSDP2 (whole objective), and no-sync accumulation.

What is wrapped: the whole :class:`~fastebm.RestorationObjective` (all T restoration steps and the
loss are one ``forward``), so DDP sees exactly one forward per backward (docs/design.md §8). The
inner ``torch.autograd.grad(E, x, create_graph=True)`` of every step only asks for the input
gradient: it does not run the parameters' gradient-accumulation nodes, so DDP's reducer hooks fire
only in the final ``loss.backward()``. Two DDP settings follow from the double backward:

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
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..errors import DistributedSetupError
from .process import is_initialized, world_size

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


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` holds FSDP2-sharded (DTensor) parameters."""
    try:
        return is_fsdp(module)
    except ImportError:
        return False


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
