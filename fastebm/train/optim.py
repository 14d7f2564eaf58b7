"""AdamW with the usual ViT weight-decay exemptions, and a step that a device-side flag can veto."""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
import torch.nn as nn

# Parameters that should not be pulled towards zero: positional/class embeddings and any
# one-dimensional tensor (norm scales and shifts, biases, the restoration step sizes).
_NO_DECAY_NAMES = ("pos_embed", "cls_token")


def split_decay(named_params: Iterable[Tuple[str, nn.Parameter]]) -> Tuple[List[nn.Parameter], List[nn.Parameter], List[str]]:
    """(decayed params, exempt params, exempt names) of the trainable parameters."""
    decay, no_decay, no_decay_names = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in _NO_DECAY_NAMES):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
    return decay, no_decay, no_decay_names


def build_optimizer(module: nn.Module, *, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW(betas 0.9/0.95 as in MAE), torch's fused implementation (CPU and CUDA kernels).

    Fused because its kernel takes the skip flag on the device (:func:`step_unless`); ``device``
    is where the parameters live (the fused kernels exist for CPU and CUDA).
    """
    decay, no_decay, _ = split_decay(module.named_parameters())
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fused AdamW runs on CPU and CUDA parameters, not {device.type}")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, except that where ``skip`` is true nothing changes; ``skip`` is never read to the host.

    ``skip``: a bool (or 0./1.) tensor with one element, on the parameters' device. torch's fused
    Adam/AdamW kernels take a ``found_inf`` tensor (the hook ``torch.amp.GradScaler`` uses): when it
    is 1 the kernel returns without touching the parameters, ``exp_avg`` and ``exp_avg_sq``, and
    the step counts it incremented are decremented again (torch/optim/adam.py, ``_fused_adam``),
    so a vetoed step leaves the parameters and moments bitwise unchanged. (On the very first step
    the optimiser creates its zero moments and step count 0 either way.) Raises TypeError for an
    optimiser without that hook (not fused).
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise TypeError(f"step_unless needs a fused optimiser (fused=True), got {type(optimizer).__name__} "
                        f"without found_inf support")
    optimizer.grad_scale = None
    optimizer.found_inf = skip.detach().reshape(()).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
