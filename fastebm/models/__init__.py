"""Model factory: ``create_model(name, img_size=..., **kw)`` -> :class:`EnergyViT`."""
from __future__ import annotations

from .vit import EnergyViT

# Widths/depths/heads as in timm's VisionTransformer presets; vit_demo is CPU-sized.
PRESETS = {
    "vit_demo": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),
    "vit_tiny_patch16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}

# The resolution fastebm-train pretrains at when --img_size is not given, where it is not the preset's
# own img_size. vit_demo pretrains at 16 px: on the built-in data, 8 epochs at 16 px cost what 2 at
# 32 px cost and gave better frozen features and fine-tuning above random init in 7 of 7 seeds
# (docs/quality.md, rounds 10-11). fastebm-eval evaluates a backbone at the size it was pretrained at,
# and builds an untrained baseline (--init) at this size, so that both are compared like for like
# (round 12: evaluated at 32 px instead, the same backbone fine-tuned lower in three times the time).
PRETRAIN_IMG_SIZE = {"vit_demo": 16}

# timm model names of the same backbones (for export / loading into timm).
TIMM_NAMES = {
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
}


def list_models():
    return sorted(PRESETS)


def pretrain_img_size(name: str) -> int:
    """Pixels fastebm-train pretrains preset ``name`` at by default, and fastebm-eval builds an untrained
    ``--init`` baseline of it at: 16 for vit_demo, else the preset's img_size. KeyError for an unknown name."""
    return int(PRETRAIN_IMG_SIZE.get(name, PRESETS[name]["img_size"]))


def create_model(name: str, img_size=None, **kwargs) -> EnergyViT:
    """Builds a preset EnergyViT; ``img_size`` and any constructor argument may be overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available presets: {', '.join(list_models())}")
    cfg = dict(PRESETS[name])
    if img_size is not None:
        cfg["img_size"] = img_size
    cfg.update(kwargs)
    return EnergyViT(**cfg)


__all__ = ["EnergyViT", "PRESETS", "PRETRAIN_IMG_SIZE", "TIMM_NAMES", "create_model", "list_models",
           "pretrain_img_size"]
