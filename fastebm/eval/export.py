"""Export the pretrained backbone for timm: training-only keys (step sizes, energy head) dropped.

``fastebm-export --ckpt last.pt --out model.safetensors`` (or ``.pth``) writes the backbone under
timm ``VisionTransformer`` names plus a JSON sidecar (``model.json``) with the timm architecture
name (``null`` for presets timm has no name for, such as ``vit_demo``), the VisionTransformer
keyword arguments, image and patch size and the input normalisation. A ``.safetensors`` file
also carries that JSON in its own metadata (key ``fastebm``), so it is self-describing.

Loading in timm (docs/evaluation.md has the full recipe)::

    timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(file="model.safetensors"))   # any img_size=
    timm.create_model("vit_small_patch16_224", checkpoint_path="model.safetensors", num_classes=0)

    meta = json.load(open("model.json"))                                       # vit_demo
    vit = VisionTransformer(**meta["model_args"], num_classes=0)
    vit.load_state_dict(safetensors.torch.load_file("model.safetensors"))     # strict
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from ..checkpoint import atomic_torch_save
from ..errors import UsageError
from ..files import atomic_write, atomic_write_json

FORMATS = (".safetensors", ".pth")


def backbone_from_objective_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``model.*`` keys of a RestorationObjective state dict, prefix removed, ``energy_head.*`` dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.") and not key.startswith("model.energy_head."):
            out[key[len("model."):]] = value
    return out


def sidecar_path(path: str) -> str:
    """``model.safetensors`` -> ``model.json``."""
    return os.path.splitext(path)[0] + ".json"


def export_metadata(bb, source: Dict[str, Any] = None) -> Dict[str, Any]:
    """The sidecar: what timm needs to rebuild the model and preprocess its input."""
    from .backbone import EXPORT_FORMAT

    a = dict(bb.arch)
    size = int(a["img_size"])
    cfg = {"input_size": [a["in_chans"], size, size], "mean": list(bb.mean), "std": list(bb.std),
           "interpolation": "bicubic", "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"}
    if bb.eval_img_size != size:  # timm's name for the size to evaluate at: kept from an export that named one
        cfg["test_input_size"] = [a["in_chans"], bb.eval_img_size, bb.eval_img_size]
    return {
        "format": EXPORT_FORMAT,
        "version": 1,
        "architecture": bb.timm_name,
        "fastebm_model": bb.preset,
        "model_args": a,
        "img_size": size,
        "patch_size": int(a["patch_size"]),
        "mean": list(bb.mean),
        "std": list(bb.std),
        "interpolation": "bicubic",
        "pretrained_cfg": cfg,
        "source": source or {},
    }


def write_export(bb, out: str, source: Dict[str, Any] = None) -> str:
    """Writes ``bb``'s weights to ``out`` (.safetensors or .pth) and the sidecar, each atomically."""
    import json

    ext = os.path.splitext(out)[1].lower()
    if ext not in FORMATS:
        raise UsageError(f"--out {out}: unknown format {ext or '(no extension)'}; end it with .safetensors (default) or .pth")
    tensors = {k: v.detach().cpu().contiguous() for k, v in bb.state.items()}
    meta = export_metadata(bb, source)
    folder = os.path.dirname(os.path.abspath(out))
    try:  # like fastebm-train's --output_dir: a missing folder is made
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create its folder {folder}: {e.strerror or e}; choose another path") from e
    if ext == ".safetensors":
        from safetensors.torch import save

        atomic_write(out, lambda fh: fh.write(save(tensors, metadata={"fastebm": json.dumps(meta), "format": "pt"})))
    else:
        atomic_torch_save(tensors, out)
    atomic_write_json(sidecar_path(out), meta)
    return out


def export_backbone(model, path: str) -> str:
    """Writes ``model.backbone_state_dict()`` (timm VisionTransformer names) atomically to ``path``, plus the sidecar."""
    from .backbone import Backbone, preset_of

    arch = {"img_size": int(model.img_size[0]), "patch_size": int(model.patch_size), "in_chans": int(model.in_chans),
            "embed_dim": int(model.embed_dim), "depth": int(model.depth), "num_heads": int(model.num_heads),
            "mlp_ratio": model.blocks[0].mlp.fc1.out_features / model.embed_dim}
    bb = Backbone(arch, model.backbone_state_dict(), "export", preset_of(arch), path)
    return write_export(bb, path, {"energy": getattr(model, "energy_type", None)})


def export_checkpoint(checkpoint_path: str, path: str) -> str:
    """Backbone of a training checkpoint (``last.pt``) or of another export, as a timm-loadable file.

    Raises UsageError for an input :func:`~fastebm.eval.backbone.read_backbone` refuses (missing, a
    folder, pickled Python objects, truncated, not a ViT) or an unknown output format; OutputError when
    the output cannot be written."""
    from .backbone import read_backbone

    bb = read_backbone(checkpoint_path)
    source = {"checkpoint": os.path.abspath(checkpoint_path), **{k: v for k, v in bb.info.items() if k != "meta"}}
    return write_export(bb, path, source)
