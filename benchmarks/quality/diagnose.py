"""Per-layer diagnostics of a ViT backbone (why fine-tuning a pretrained backbone can lose to random init).

For 256 training digits (no labels used), through timm's ``VisionTransformer`` loaded as
fastebm-eval loads it: per block the residual stream's patch-token norm and per-token std (what
the next LayerNorm divides by), the attention and MLP branches' output norms, attention entropy
(normalised by log N: 1 = uniform), the share of the token norm common to all tokens; the final
norm's gain and bias; every weight's norm; the effective rank (exp of the spectral entropy; Roy &
Vetterli 2007) of the pooled features and of the normed patch tokens; and ``fragility``: the mean
shift of the pooled features after one Adam-like step (every backbone weight moved by +-1e-3,
random signs, 3 draws), in units of their between-image spread (how far one fine-tuning step
moves the features).

    python benchmarks/quality/diagnose.py (--ckpt FILE | --init random|fastebm) --seed S --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

IMAGES = 256


def effective_rank(mat: np.ndarray) -> float:
    mat = mat - mat.mean(0, keepdims=True)
    s = np.linalg.svd(mat, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def pooled(model, x):
    return model.forward_features(x)[:, 1:].mean(1)


@torch.no_grad()
def fragility(model, x, spread: float, lr: float = 1e-3, trials: int = 3) -> float:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = pooled(model, x)
    g = torch.Generator().manual_seed(0)
    moves = []
    for _ in range(trials):
        for name, p in model.named_parameters():
            if not name.startswith("head"):
                p.add_(lr * (torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.dtype))
        moves.append(float((pooled(model, x) - base).pow(2).mean(0).sqrt().mean() / spread))
        model.load_state_dict(state)
    return float(np.mean(moves))


@torch.no_grad()
def diagnose(model, x) -> dict:
    """The diagnostics of ``model`` (timm ViT, eval mode) on the normalised batch ``x``."""
    model.eval()
    out = {"blocks": []}
    h = model._pos_embed(model.patch_embed(x))
    out["embed_norm_patch"] = float(h[:, 1:].norm(dim=-1).mean())
    for blk in model.blocks:
        a_in = blk.norm1(h)
        attn = blk.attn
        b, n, c = a_in.shape
        qkv = attn.qkv(a_in).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        entropy = float((-(p * p.clamp_min(1e-12).log()).sum(-1)).mean() / math.log(n))
        a_out = blk.ls1(attn(a_in))
        h = h + a_out
        m_out = blk.ls2(blk.mlp(blk.norm2(h)))
        h = h + m_out
        tok = h[:, 1:]
        norms = tok.norm(dim=-1)
        out["blocks"].append({"attn_entropy": entropy, "attn_out_norm": float(a_out[:, 1:].norm(dim=-1).mean()),
                              "mlp_out_norm": float(m_out[:, 1:].norm(dim=-1).mean()),
                              "token_norm_patch": float(norms.mean()), "token_std": float(tok.std(-1).mean()),
                              "common_share": float(tok.mean(1).norm(dim=-1).mean() / norms.mean())})
    normed = model.norm(h)
    out["final_norm_gain_mean"] = float(model.norm.weight.mean())
    out["final_norm_gain_absmax"] = float(model.norm.weight.abs().max())
    out["final_norm_bias_absmean"] = float(model.norm.bias.abs().mean())
    out["weight_norms"] = {n: float(p.norm()) for n, p in model.named_parameters() if not n.startswith("head")}
    f = pooled(model, x).double().numpy()
    out["pooled_between_image_std"] = float(f.std(0).mean())
    out["erank_pooled"] = effective_rank(f)
    out["erank_tokens"] = effective_rank(normed[:64, 1:].reshape(-1, normed.shape[-1]).double().numpy())
    out["fragility"] = fragility(model, x, float(f.std(0).mean()))
    return out


def main(argv=None) -> int:
    from fastebm.eval.backbone import init_backbone, read_backbone
    from fastebm.eval.datasets import builtin_digit_split
    from fastebm.eval.psnr import IMAGENET_MEAN, IMAGENET_STD
    from fastebm.eval.timm_vit import build_classifier

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt")
    src.add_argument("--init", choices=("random", "fastebm"))
    ap.add_argument("--img_size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bb = read_backbone(args.ckpt) if args.ckpt else init_backbone(args.init, "vit_demo", args.img_size, args.seed)
    model = build_classifier(bb, 0, img_size=args.img_size, global_pool="avg", drop_path_rate=0.0, head_init_std=1.0,
                             seed=args.seed)
    x_tr = builtin_digit_split(args.img_size)[0][:IMAGES]
    m = torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, -1, 1, 1)
    result = diagnose(model, (x_tr.float() / 255.0 - m) / s)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
