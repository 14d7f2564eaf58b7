"""How far fine-tuning moved a backbone: per-block weight drift and representation similarity (linear CKA).

Round 16 saw timm's random init move much further from its LP-FT start than a fastebm backbone (peak fine-tuning
loss 2.10 against 1.29) and end higher with 100 labels. This measures it for finished ``fastebm-eval finetune``
runs (their ``checkpoint.pt``): the starting model is rebuilt from the run's own config exactly as fastebm-eval
built it (the same backbone file or seeded init, the same seed), and for each group of backbone weights
(``patch_embed``, ``pos_embed`` with ``cls_token``, every block, the final ``norm``; the head is left out)

* ``drift``: ||theta_end - theta_start|| / ||theta_start|| over the group's weights (0 = unmoved);
* ``cka``: linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited", eq. 5)
  between the start's and the end's mean patch token after each block, and of the pooled feature the head reads,
  on the run's validation images (1 = the same representation up to rotation and scale).

    python benchmarks/quality/ft_drift.py RUN_DIR [RUN_DIR ...] --out FILE.json [--images 512]

Prints one row per run and writes every number to FILE.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import torch


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same n inputs: x (n, p), y (n, q), any float dtype; in [0, 1].
    Computed in float64 on column-centred features as ||y^T x||_F^2 / (||x^T x||_F ||y^T y||_F)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    num = np.linalg.norm(y.T @ x) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def weight_group(name: str) -> str | None:
    """The group a backbone parameter belongs to (``block3`` for blocks.3.*), or None for the head."""
    if name.startswith("head."):
        return None
    if name.startswith("blocks."):
        return "block" + name.split(".")[1]
    if name in ("pos_embed", "cls_token", "reg_token"):
        return "pos_embed"
    return name.split(".")[0]


def drift(start: Dict[str, torch.Tensor], end: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per group, ||end - start|| / ||start|| over every floating parameter both state dicts hold (head excluded)."""
    num: Dict[str, float] = {}
    den: Dict[str, float] = {}
    for name, a in start.items():
        group = weight_group(name)
        if group is None or name not in end or not a.is_floating_point():
            continue
        a64, b64 = a.double(), end[name].double()
        num[group] = num.get(group, 0.0) + float(((b64 - a64) ** 2).sum())
        den[group] = den.get(group, 0.0) + float((a64 ** 2).sum())
    return {g: (num[g] / den[g]) ** 0.5 if den[g] > 0 else float("nan") for g in num}


@torch.no_grad()
def block_features(model, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """Per block the mean patch token after it (``block0`` ...), and ``pooled``: what the head reads."""
    model.eval()
    depth = len(model.blocks)
    outs = model.forward_intermediates(x, indices=list(range(depth)), norm=False, output_fmt="NLC",
                                       intermediates_only=True)
    feats = {f"block{i}": o.mean(1).numpy() for i, o in enumerate(outs)}
    feats["pooled"] = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    return feats


def run_models(run_dir: str):
    """(start model, end model, validation images (N, 3, S, S) normalised as the run evaluated them) of one run."""
    from fastebm.eval.backbone import eval_size, resolve_backbone
    from fastebm.eval.datasets import load_eval_data, make_transforms, with_transform
    from fastebm.eval.timm_vit import build_classifier

    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)
    cfg = SimpleNamespace(**ck["config"])
    bb = resolve_backbone(cfg)
    img_size = eval_size(cfg, bb)
    data = load_eval_data(cfg, img_size)
    make = lambda: build_classifier(bb, len(data.classes), img_size=img_size, global_pool=cfg.global_pool,  # noqa: E731
                                    drop_path_rate=0.0, head_init_std=cfg.head_init_std, seed=cfg.seed)
    start, end = make(), make()
    end.load_state_dict(ck["model"])
    val = with_transform(data.val, make_transforms(cfg, img_size, bb.mean, bb.std, training=False))
    return start, end, val


def measure(run_dir: str, images: int) -> Dict:
    start, end, val = run_models(run_dir)
    n = min(images, len(val))
    x = torch.stack([val[i][0] for i in range(n)])
    fs, fe = block_features(start, x), block_features(end, x)
    return {"run": run_dir, "images": n, "drift": drift(start.state_dict(), end.state_dict()),
            "cka": {k: linear_cka(fs[k], fe[k]) for k in fs}}


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="fastebm-eval finetune output folders (each with checkpoint.pt)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=512, help="validation images the CKA is computed on")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run_dir in args.runs:
        if not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            print(f"ft_drift: {run_dir} has no checkpoint.pt (a fastebm-eval finetune run saves one unless "
                  f"--save_ckpt false); skipped", file=sys.stderr)
            continue
        row = measure(run_dir, args.images)
        rows.append(row)
        blocks = sorted(k for k in row["drift"] if k.startswith("block"))
        print(os.path.basename(run_dir.rstrip("/")), "drift", " ".join(f"{row['drift'][b]:.3f}" for b in blocks),
              "| cka", " ".join(f"{row['cka'][b]:.3f}" for b in blocks), f"pooled {row['cka']['pooled']:.3f}", flush=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"command": " ".join(["python", "benchmarks/quality/ft_drift.py", *(argv or sys.argv[1:])]), "runs": rows},
                  fh, indent=1)
    os.replace(tmp, args.out)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
