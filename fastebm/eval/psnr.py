"""PSNR gain of restoration: how many dB the energy-descent steps add over the corrupted input.

For each task, held-out images are corrupted (deterministically, from a fixed seed), restored by
``objective.restore`` (T steps) and compared with the clean images in [0, 1] pixel space (the
normalisation undone, values clamped to [0, 1]). Per image, the MSE is taken over the task's
weighted region (``weight > 0``: the masked patches for ``mim``, every pixel for the other
tasks) and PSNR = 10 log10(1 / MSE). The gain is mean_i PSNR(restored_i) - mean_i
PSNR(corrupted_i); ``psnr_gain_db`` is the mean of the per-task gains.

Images that a task leaves unchanged (e.g. ``colorize`` on a grey digit: corrupted == clean) have
nothing to restore and an infinite input PSNR; they are left out of that task's average.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from ..corrupt import IMAGENET_MEAN, IMAGENET_STD, prepare_batch

EVAL_SEED = 1234  # corruption draws of the evaluation (fixed so init and pretrained see the same inputs)


def to_unit_range(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised images -> [0, 1] pixels (clamped)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0.0, 1.0)


def region_psnr(x: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [0,1] images over the pixels where ``weight > 0`` (all channels)."""
    region = (weight > 0).to(x.dtype).expand_as(x)
    sq = (x - ref).pow(2) * region
    mse = sq.flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1.0)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def psnr_gain(objective, images: torch.Tensor, tasks: Iterable[str], *, patch_size: int,
              params: Optional[dict] = None, device=None, batch_size: int = 128) -> Dict[str, Dict[str, float]]:
    """{task: {"corrupted": dB, "restored": dB, "gain": dB}} on uint8 ``images`` (N, 3, H, W)."""
    device = device or next(objective.parameters()).device
    was_training = objective.training
    objective.eval()
    out = {}
    try:
        for task in tasks:
            before, after = [], []
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size].to(device)
                ids = torch.arange(start, start + len(chunk))
                clean, corrupted, weight, _ = prepare_batch(chunk, [task], seed=EVAL_SEED, offset=0, sample_ids=ids,
                                                            patch_size=patch_size, params=params)
                restored = objective.restore(corrupted)[-1]
                ref, damaged = to_unit_range(clean), to_unit_range(corrupted)
                changed = (damaged - ref).abs().flatten(1).amax(1) > 0.5 / 255
                before.append(region_psnr(damaged, ref, weight)[changed])
                after.append(region_psnr(to_unit_range(restored), ref, weight)[changed])
            before_t, after_t = torch.cat(before), torch.cat(after)
            if len(before_t) == 0:
                continue  # the task changed none of these images
            b, a = before_t.mean().item(), after_t.mean().item()
            out[task] = {"corrupted": b, "restored": a, "gain": a - b, "images": int(len(before_t))}
    finally:
        objective.train(was_training)
    return out


def mean_gain(per_task: Dict[str, Dict[str, float]]) -> float:
    return sum(v["gain"] for v in per_task.values()) / max(1, len(per_task))
