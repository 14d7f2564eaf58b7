"""FSDP2 state dicts in the plain checkpoint format (and back).

An FSDP2 run gathers its sharded parameters and optimiser state into the same plain, unsharded
dicts a DDP or single-process run writes (docs/design.md §9), so a checkpoint resumes with or
without ``--fsdp``. Functions marked *collective* must be called by every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .wrap import is_sharded


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
