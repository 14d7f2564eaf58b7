"""AdamW with the usual ViT weight-decay exemptions."""
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
    """AdamW(betas 0.9/0.95 as in MAE); torch's fused implementation on CUDA."""
    decay, no_decay, _ = split_decay(module.named_parameters())
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **kw)
