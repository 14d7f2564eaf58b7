"""Export the pretrained backbone for timm: training-only keys (step sizes, energy head) dropped."""
from __future__ import annotations

from typing import Dict

import torch

from ..checkpoint import atomic_torch_save, load_checkpoint


def backbone_from_objective_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``model.*`` keys of a RestorationObjective state dict, prefix removed, ``energy_head.*`` dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.") and not key.startswith("model.energy_head."):
            out[key[len("model."):]] = value
    return out


def export_backbone(model, path: str) -> str:
    """Writes ``model.backbone_state_dict()`` (timm VisionTransformer names) atomically to ``path``."""
    atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in model.backbone_state_dict().items()}, path)
    return path


def export_checkpoint(checkpoint_path: str, path: str) -> str:
    """Backbone of a training checkpoint (``last.pt``) as a plain timm-loadable state dict."""
    state = load_checkpoint(checkpoint_path)
    atomic_torch_save(backbone_from_objective_state(state["model"]), path)
    return path
