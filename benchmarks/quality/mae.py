"""An MAE-style baseline written for the quality benchmark: the same encoder, data and optimiser as fastebm.

Masked autoencoder (He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022; the reference is their ``models_mae.py``), cut to what differs from fastebm:

* encoder: fastebm's ``EnergyViT`` (``vit_demo``: 32 px, patch 4, width 128, depth 4, 4 heads),
  with its own initialisation, run on the visible patches only (plus the class token); its energy
  head is unused. Its weights are exported under timm names like a fastebm backbone;
* masking: 75 % of the 64 patches per image, a fresh uniform draw per image (argsort of noise);
* decoder: a linear map to width 64, a learned mask token, fixed 2-D sin-cos position embeddings,
  2 pre-norm transformer blocks (timm ``Block``, 2 heads of 32, MLP x4), LayerNorm, a linear
  prediction of each patch's 4 x 4 x 3 pixels; xavier-uniform linear layers (MAE's init);
* loss: MSE on the masked patches against per-patch normalised pixels (MAE's ``norm_pix_loss``);
* data: fastebm-train's built-in pipeline (``BuiltinDemoData``: 1,300 training digits and 1,500
  random photo crops per epoch, ``BatchPlan``'s seeded order), ImageNet mean/std normalisation;
* optimiser: fastebm-train's (fused AdamW, betas 0.9/0.95, weight decay 0.05 except norms, biases,
  embeddings; lr = blr x batch / 256; linear warm-up over 5 % of the steps, as fastebm's 0.1 epoch
  was of its 2 epochs before round 11 (of today's 8: 1.25 %), then cosine to 1e-5 per step;
  gradient-norm clip 1.0). The base lr (``MAE_BLR``, 0.006) was searched with ``mae_lr.py`` on a
  validation split of the training digits (grid 0.003 to 0.048, linear-probe top-1 on the split;
  benchmarks/results/quality/mae_lr.json). The study
  first ran with fastebm-train's default, 0.024, which is far worse for MAE (docs/quality.md).

    python benchmarks/quality/mae.py --output_dir DIR --epochs E --seed S [--blr B] [--max_steps N] [--img_size PX]
        [--pretrain_data {builtin,photos}] [--overwrite]

``--pretrain_data photos`` pretrains without the digits (photos_only.py: photo crops in the digits' slots, round 15).

Writes DIR/backbone.pth (timm names) and DIR/summary.json (loss, steps, wall time, FLOPs per step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

MASK_RATIO = 0.75
DECODER_DIM, DECODER_DEPTH, DECODER_HEADS = 64, 2, 2
MAE_BLR = 0.006  # searched on the validation split of the training digits: mae_lr.py, benchmarks/results/quality/mae_lr.json
WARMUP_FRACTION = 0.05
MIN_LR = 1e-5


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sin-cos position embedding (MAE's ``get_2d_sincos_pos_embed``)."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_axis(dim // 2, gh), one_axis(dim // 2, gw)], axis=1)
    return torch.from_numpy(emb).float()


class MaskedAutoencoder(nn.Module):
    """``forward(x) -> (loss, pred, mask)`` for a normalised batch ``x`` (B, 3, S, S) float32.

    ``pred`` (B, N, p*p*3) are the decoder's patch predictions, ``mask`` (B, N) is 1 on masked patches.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = MASK_RATIO, decoder_dim: int = DECODER_DIM,
                 decoder_depth: int = DECODER_DEPTH, decoder_heads: int = DECODER_HEADS):
        import functools

        from timm.models.vision_transformer import Block

        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        p, dim = encoder.patch_size, encoder.embed_dim
        self.grid = encoder.patch_embed.grid_size[0]
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = torch.cat([torch.zeros(1, decoder_dim), sincos_2d(decoder_dim, self.grid)])
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * encoder.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue  # the encoder keeps EnergyViT's own initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p, g = self.encoder.patch_size, self.grid
        x = x.reshape(x.shape[0], x.shape[1], g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(x.shape[0], g * g, p * p * x.shape[1])

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        b, n, d = tokens.shape
        keep = int(n * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        visible = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        h = torch.cat([cls, visible], dim=1)
        for blk in enc.blocks:
            h = blk(h)
        return enc.norm(h), mask, ids_restore

    def decode(self, h: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        h = self.decoder_embed(h)
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n + 1 - h.shape[1], -1)
        tokens = torch.cat([h[:, 1:], fill], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, h.shape[2]))
        h = torch.cat([h[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            h = blk(h)
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, mask, ids_restore = self.encode(x)
        pred = self.decode(h, ids_restore)
        target = self.patchify(x)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5  # norm_pix_loss
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


def build(seed: int, model: str = "vit_demo", img_size: int = None) -> MaskedAutoencoder:
    """The MAE around a fresh ``model`` encoder at ``img_size`` px (None: the preset's, 32 for vit_demo)."""
    import fastebm

    torch.manual_seed(seed)
    return MaskedAutoencoder(fastebm.create_model(model, img_size=img_size))


def batch_images(data, plan, step: int) -> torch.Tensor:
    """The uint8 batch of optimiser step ``step`` (global), as fastebm-train's loader draws it."""
    return torch.stack([data.load(k.index, k.epoch)[0] for k in plan.micro_batch_keys(step, 0)])


def normalise(images: torch.Tensor) -> torch.Tensor:
    from fastebm.corrupt import IMAGENET_MEAN, IMAGENET_STD

    m = torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def train(output_dir: str, epochs: float, seed: int, blr: float = MAE_BLR, batch_size: int = 32,
          max_steps: int = None, img_size: int = None, pretrain_data: str = "builtin", log=print) -> Dict:
    """Pretrains the MAE baseline on ``pretrain_data`` (photos_only.PRETRAIN_DATA); writes backbone.pth and
    summary.json under ``output_dir``."""
    from photos_only import data_class
    from fastebm.data.sampling import BatchPlan
    from fastebm.ops import first_order_attention
    from fastebm.train.optim import build_optimizer
    from fastebm.train.schedule import lr_at, scaled_lr

    t0 = time.time()
    mae = build(seed, img_size=img_size)
    data = data_class(pretrain_data)(mae.encoder.img_size[0], seed)
    plan = BatchPlan(len(data), batch_size, seed=seed)
    total = max(1, int(round(epochs * plan.steps_per_epoch)))
    run_steps = total if max_steps is None else min(total, max_steps)
    warmup = int(round(WARMUP_FRACTION * total))
    base_lr = scaled_lr(blr, batch_size, 1, 1)
    opt = build_optimizer(mae, lr=base_lr, weight_decay=0.05, device=torch.device("cpu"))
    losses = []
    torch.manual_seed(seed + 1)  # the masks' stream
    for step in range(run_steps):
        lr = lr_at(step, base_lr=base_lr, min_lr=MIN_LR, warmup_steps=warmup, total_steps=total)
        for g in opt.param_groups:
            g["lr"] = lr
        x = normalise(batch_images(data, plan, step))
        with first_order_attention():  # no double backward here: the fastest attention (same math)
            loss, _, _ = mae(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"MAE loss is not finite at step {step}")
        if step % 50 == 0 or step == run_steps - 1:
            log(f"mae step {step + 1}/{run_steps} loss {losses[-1]:.4f} lr {lr:.2e}")
    os.makedirs(output_dir, exist_ok=True)
    backbone = os.path.join(output_dir, "backbone.pth")
    torch.save(mae.encoder.backbone_state_dict(), backbone + ".tmp")
    os.replace(backbone + ".tmp", backbone)
    summary = {"method": "mae", "epochs": epochs, "steps": run_steps, "total_steps": total, "blr": blr, "lr": base_lr,
               "batch_size": batch_size, "seed": seed, "img_size": mae.encoder.img_size[0], "pretrain_data": pretrain_data,
               "final_loss": float(np.mean(losses[-10:])),
               "first_loss": losses[0], "wall_time_s": time.time() - t0, "backbone": backbone,
               "mask_ratio": mae.mask_ratio, "decoder": {"dim": DECODER_DIM, "depth": DECODER_DEPTH, "heads": DECODER_HEADS}}
    path = os.path.join(output_dir, "summary.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(summary, fh, indent=1)
    os.replace(path + ".tmp", path)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MAE-style baseline pretraining on the built-in data (quality benchmark)")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--epochs", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blr", type=float, default=MAE_BLR)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_steps", type=int, default=None)
    ap.add_argument("--img_size", type=int, default=None, help="pretraining size in px (default: vit_demo's 32; the study's default MAE arms give 16)")
    ap.add_argument("--pretrain_data", choices=("builtin", "photos"), default="builtin",
                    help="builtin: fastebm-train's built-in data; photos: the same with photo crops in the digits' slots (photos_only.py)")
    ap.add_argument("--overwrite", action="store_true", help="replace the backbone and summary already in --output_dir")
    args = ap.parse_args(argv)
    if args.img_size is not None and (args.img_size < 4 or args.img_size % 4):
        ap.error(f"--img_size {args.img_size}: give a multiple of vit_demo's patch size 4 (e.g. 16 or 32)")
    held = [f for f in ("backbone.pth", "summary.json") if os.path.exists(os.path.join(args.output_dir, f))]
    if held and not args.overwrite:
        ap.error(f"--output_dir {args.output_dir!r} holds a finished MAE run ({', '.join(held)}): "
                 f"give another --output_dir, or --overwrite to replace it")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = train(args.output_dir, args.epochs, args.seed, args.blr, args.batch_size, args.max_steps, args.img_size, args.pretrain_data)
    print(json.dumps({k: s[k] for k in ("steps", "final_loss", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
