"""Pictures of a run: the restoration grid and the loss curve (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..corrupt import prepare_batch  # noqa: E402
from ..eval.psnr import to_unit_range  # noqa: E402
from ..runlog import read_metrics  # noqa: E402
from .rng import side_rng  # noqa: E402

GRID_SEED = 4321
GRID_FILE = "restoration_grid.png"
LOSS_FILE = "loss_curve.png"


def draw_pictures(cfg, objective, preview: torch.Tensor, device: torch.device, step: int) -> None:
    """Refreshes OUTPUT_DIR's restoration grid (preview images) and loss curve (metrics.jsonl so far).

    Runs under :func:`~fastebm.train.rng.side_rng`, so drawing never moves the training RNG streams.
    """
    with side_rng(device):
        restoration_grid(objective, preview, cfg.tasks, os.path.join(cfg.output_dir, GRID_FILE),
                         patch_size=objective.model.patch_size, params=cfg.task_params,
                         title=f"{cfg.model}, step {step}: rows clean / corrupted / after each restoration step")
    loss_curve(read_metrics(cfg.output_dir), os.path.join(cfg.output_dir, LOSS_FILE), title=f"{cfg.model} training loss")


def _row(images01: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [0,1] -> one (H, N*(W+pad)-pad, 3) strip."""
    n, _, h, w = images01.shape
    strip = np.ones((h, n * (w + pad) - pad, 3), dtype=np.float32)
    for i in range(n):
        strip[:, i * (w + pad): i * (w + pad) + w] = images01[i].permute(1, 2, 0).cpu().numpy()
    return strip


def restoration_grid(objective, images: torch.Tensor, tasks: Sequence[str], path: str, *, patch_size: int,
                     params=None, title: str = "") -> str:
    """Saves a PNG: for each task, rows clean / corrupted / after step 1..T of the same images."""
    device = next(objective.parameters()).device
    was_training = objective.training
    objective.eval()
    rows, labels = [], []
    try:
        for task in tasks:
            clean, corrupted, weight, _ = prepare_batch(images.to(device), [task], seed=GRID_SEED, offset=0,
                                                        sample_ids=torch.arange(len(images)), patch_size=patch_size,
                                                        params=params)
            xs = objective.restore(corrupted)
            rows += [_row(to_unit_range(clean)), _row(to_unit_range(corrupted))]
            labels += [f"{task}: clean", f"{task}: corrupted"]
            for t, x in enumerate(xs[1:], start=1):
                rows.append(_row(to_unit_range(x)))
                labels.append(f"{task}: step {t}")
    finally:
        objective.train(was_training)
    h, w = rows[0].shape[:2]
    gap = 2
    canvas = np.ones((len(rows) * (h + gap) - gap, w, 3), dtype=np.float32)
    for i, r in enumerate(rows):
        canvas[i * (h + gap): i * (h + gap) + h] = r
    scale = max(1.0, 96.0 / h)  # small images are drawn bigger so the labels stay readable
    fig_w = w * scale / 100 + 2.4  # room for the row labels
    fig_h = canvas.shape[0] * scale / 100 + 0.5
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([i * (h + gap) + h / 2 for i in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path


def loss_curve(records: List[Dict], path: str, title: str = "") -> str:
    """Saves a PNG of the training loss (and per-step losses) against optimiser steps, lr on a twin axis."""
    recs = [r for r in records if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if recs:
        steps = [r["step"] for r in recs]
        ax.plot(steps, [r["loss"] for r in recs], label="loss (sum over steps)", color="C0")
        step_keys = sorted((k for k in recs[0] if k.startswith("loss_t/")), key=lambda k: int(k.split("/")[1]))
        for key in step_keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in recs], label=f"after step {key.split('/')[1]}", lw=0.8, alpha=0.8)
        if "loss_corrupted" in recs[0]:
            ax.plot(steps, [r.get("loss_corrupted", float("nan")) for r in recs], label="corrupted input", lw=0.8, ls="--", color="gray")
        ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("weighted MSE (normalised pixels)")
        ax.legend(fontsize=7, loc="upper right")
        if "lr" in recs[0]:
            ax2 = ax.twinx()
            ax2.plot(steps, [r.get("lr", float("nan")) for r in recs], color="C3", lw=0.6, alpha=0.5)
            ax2.set_ylabel("learning rate", color="C3", fontsize=8)
            ax2.tick_params(axis="y", labelsize=7, colors="C3")
    ax.set_title(title or "training loss", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # a viewer refreshing the file never sees half a PNG
