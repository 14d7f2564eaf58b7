"""Did fine-tuning fit its labels? Top-1 of a fine-tuned classifier on its own labelled training images.

Reads a ``fastebm-eval finetune`` checkpoint.pt (model with its head, the run's config), rebuilds
the run's labelled training set (its --few_shot and --seed, so the same images) and scores it with the evaluation
transform (no augmentation, eval mode), which the running training accuracy of the last epoch
(augmented crops, drop path) cannot show.

    python benchmarks/quality/train_accuracy.py --ckpt FT/checkpoint.pt --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import os

import torch


@torch.no_grad()
def train_accuracy(ckpt: str) -> dict:
    from fastebm.eval.backbone import Backbone, arch_from_state, preset_of
    from fastebm.eval.config import make_config
    from fastebm.eval.datasets import load_eval_data, make_transforms, with_transform
    from fastebm.eval.timm_vit import create_vit

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = make_config("finetune", **{k: state["config"][k] for k in ("ckpt", "init", "model", "img_size", "data", "train_dir",
                                                                       "val_dir", "interpolation", "crop_pct", "global_pool",
                                                                       "few_shot", "seed")})
    weights = state["model"]
    arch = arch_from_state(weights, None, ckpt)
    model = create_vit(Backbone(arch, None, "export", preset_of(arch)), weights["head.weight"].shape[0],
                       global_pool=cfg.global_pool).eval()
    model.load_state_dict(weights)
    data = load_eval_data(cfg, arch["img_size"])
    from fastebm.corrupt import IMAGENET_MEAN, IMAGENET_STD

    ds = with_transform(data.train, make_transforms(cfg, arch["img_size"], IMAGENET_MEAN, IMAGENET_STD, training=False))
    correct = 0
    for start in range(0, len(ds), 256):
        batch = [ds[i] for i in range(start, min(len(ds), start + 256))]
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch])
        correct += int((model(x).argmax(1) == y).sum())
    return {"train_eval_top1": correct / len(ds), "images": len(ds)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = train_accuracy(args.ckpt)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(result, fh)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
