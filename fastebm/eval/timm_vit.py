"""A timm ``VisionTransformer`` built from a :class:`~fastebm.eval.backbone.Backbone`.

The backbone's weights load strictly (only the new classifier is missing); at another image size
the position embedding is resampled with timm's ``resample_abs_pos_embed`` (bicubic, class token
kept). ``global_pool="avg"`` uses ``fc_norm=False``: the pretrained final norm is applied to every
token and the patch tokens are averaged, which is exactly the feature fastebm's own probe uses;
timm's default for ``avg`` (a new ``fc_norm`` after pooling, MAE's choice) would leave the
pretrained ``norm`` unused and the new one untrained.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..errors import UsageError
from .backbone import Backbone


def check_img_size(arch: Dict, img_size: int) -> None:
    p = arch["patch_size"]
    if img_size % p:
        lo = max(p, img_size // p * p)
        raise UsageError(f"--img_size {img_size} is not divisible by the patch size {p}; use a multiple of {p} "
                         f"(e.g. {lo} or {lo + p})")


def create_vit(bb: Backbone, num_classes: int, *, img_size: Optional[int] = None, global_pool: str = "avg",
               drop_path_rate: float = 0.0) -> torch.nn.Module:
    """timm model of the backbone's architecture (timm's name when it has one), untrained."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(bb.arch)
    kw["img_size"] = int(img_size or kw["img_size"])
    check_img_size(kw, kw["img_size"])
    kw.update(num_classes=num_classes, global_pool=global_pool, fc_norm=False, drop_path_rate=drop_path_rate)
    if bb.timm_name:
        return timm.create_model(bb.timm_name, pretrained=False, **kw)
    return VisionTransformer(**kw)


def resample_state(state: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """``pos_embed`` resampled to the model's patch grid when the sizes differ (timm's function)."""
    from timm.layers import resample_abs_pos_embed

    pos = state.get("pos_embed")
    target = model.pos_embed
    if pos is None or pos.shape == target.shape:
        return state
    old = int(round((pos.shape[1] - 1) ** 0.5))
    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=list(model.patch_embed.grid_size),
                                              old_size=[old, old], num_prefix_tokens=1).to(pos.dtype)
    return out


def load_backbone_weights(model, bb: Backbone) -> None:
    """Copies the backbone into ``model``; anything but a missing classifier is an architecture mismatch."""
    if bb.state is None:
        return
    state = resample_state(bb.state, model)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UsageError(f"--ckpt {bb.path}: tensor shapes do not fit the model ({'; '.join(wrong[:3])}); "
                         f"it holds another architecture")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise UsageError(f"--ckpt {bb.path} holds another architecture: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")


def build_classifier(bb: Backbone, num_classes: int, *, img_size: Optional[int], global_pool: str,
                     drop_path_rate: float, head_init_std: float, seed: int) -> torch.nn.Module:
    """Seeded timm ViT with the backbone loaded and a new head ~ trunc_normal(std=head_init_std), bias 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_vit(bb, num_classes, img_size=img_size, global_pool=global_pool, drop_path_rate=drop_path_rate)
    load_backbone_weights(model, bb)
    if num_classes > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            torch.nn.init.trunc_normal_(model.head.weight, std=head_init_std)
        torch.nn.init.zeros_(model.head.bias)
    return model
