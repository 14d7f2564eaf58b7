"""``fastebm-eval linprobe``: a linear classifier on frozen features, MAE's protocol.

MAE (He et al. 2022, appendix A.2, ``main_linprobe.py``): the head is ``BatchNorm1d(D,
affine=False, eps=1e-6)`` followed by a linear layer initialised with trunc_normal(std 0.01);
LARS (timm's ``Lars``, trust coefficient 0.001) with weight decay 0, lr = blr * batch / 256,
linear warm-up then cosine decay per iteration (timm's ``CosineLRScheduler``). MAE's LARS adapts
every tensor with more than one dimension and leaves biases alone, whatever the weight decay:
here the weight's parameter group has ``always_adapt=True`` and the bias's ``False``.

Difference from MAE: the backbone is frozen and deterministic, so the features are computed once
(resize + centre crop, no training augmentation) and the head trains on the cached features,
which makes a 90-epoch probe take seconds on small data.
"""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.nn as nn

from ..data.sampling import generator_for
from .features import frozen_features
from .neighbors import topk_accuracy
from .runio import base_summary, finish, plot_curves, what_line

PLOT_FILE = "accuracy.png"


def make_head(dim: int, num_classes: int, std: float, seed: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.empty_like(head[1].weight)
        head[1].weight.copy_(nn.init.trunc_normal_(w, std=std, generator=g))
        head[1].bias.zero_()
    return head


def make_optimizer(head: nn.Sequential, cfg, lr: float) -> torch.optim.Optimizer:
    linear = head[1]
    if cfg.opt == "lars":
        from timm.optim import Lars

        groups = [{"params": [linear.weight], "always_adapt": True}, {"params": [linear.bias], "always_adapt": False}]
        return Lars(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg, lr: float, steps_per_epoch: int):
    from timm.scheduler import CosineLRScheduler

    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


@torch.no_grad()
def evaluate_head(head, f: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    head.eval()
    scores = head(f)
    loss = float(nn.functional.cross_entropy(scores, y))
    return {"top1": topk_accuracy(scores, y, 1), "top5": topk_accuracy(scores, y, 5), "loss": loss}


def train_head(cfg, f_tr, y_tr, f_va, y_va, num_classes: int, log=None):
    """Trains MAE's probe head on cached features; returns (head, per-epoch history)."""
    torch.manual_seed(cfg.seed)
    head = make_head(f_tr.shape[1], num_classes, cfg.head_init_std, cfg.seed)
    batch = min(cfg.batch_size, len(f_tr))
    steps = len(f_tr) // batch  # drop_last, as MAE
    lr = cfg.lr if cfg.lr is not None else cfg.blr * batch / 256
    optimizer = make_optimizer(head, cfg, lr)
    scheduler = make_scheduler(optimizer, cfg, lr, steps)
    history, updates = [], 0
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(len(f_tr), generator=generator_for(cfg.seed, 1, epoch))
        total = 0.0
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            loss = nn.functional.cross_entropy(head(f_tr[idx]), y_tr[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
            total += float(loss.detach())
        rec = {"epoch": epoch + 1, "step": epoch + 1, "train_loss": total / steps,
               "lr": optimizer.param_groups[0]["lr"]}
        rec.update({f"val_{k}": v for k, v in evaluate_head(head, f_va, y_va).items()})
        history.append(rec)
        if log is not None:
            log(rec)
    return head, {"lr": lr, "batch_size": batch, "steps_per_epoch": steps}, history


def run_linprobe(cfg) -> Dict:
    """Runs ``fastebm-eval linprobe`` with a checked :class:`~fastebm.eval.config.LinprobeConfig`."""
    run, bb, data, layer, (f_tr, y_tr), (f_va, y_va) = frozen_features(
        "linprobe", cfg, f"{cfg.opt}, {cfg.epochs} epochs on cached features", max(64, min(cfg.batch_size, 1024)))
    try:
        summary = base_summary(run, cfg, bb, data)
        history = []
        if run.is_main:  # the head is tiny: rank 0 trains it on all features
            from ..runlog import MetricsLogger

            logger = MetricsLogger(cfg.output_dir)
            try:
                _, used, history = train_head(cfg, f_tr, y_tr, f_va, y_va, data.num_classes, logger.log)
            finally:
                logger.close()
            best = max(history, key=lambda r: r["val_top1"])
            last = history[-1]
            summary.update({"top1": last["val_top1"], "top5": last["val_top5"], "best_top1": best["val_top1"],
                            "best_epoch": best["epoch"], "layer": layer, "pool": cfg.pool,
                            "final_norm": cfg.final_norm, "history": history, **used})
        table = _table(summary, cfg, layer) if run.is_main else ""
        plot = (PLOT_FILE, lambda fh: plot_curves(fh, [r["epoch"] for r in history], {"val top-1": [r["val_top1"] for r in history]},
                                                   "epoch", f"linear probe ({cfg.opt}, layer {layer}, pool {cfg.pool})"))
        summary = finish(run, cfg, summary, table, plot)
        if run.is_main:
            run.say(f"linprobe: top-1 {100 * summary['top1']:.2f} % (best {100 * summary['best_top1']:.2f} % at epoch "
                    f"{summary['best_epoch']}); outputs in {os.path.abspath(cfg.output_dir)}")
        return summary
    finally:
        run.close()


def _table(s: Dict, cfg, layer: int) -> str:
    return (f"# Linear probe ({what_line(s)})\n\nMAE head (BatchNorm without affine + linear), {cfg.opt}, lr {s['lr']:.3g} "
            f"(batch {s['batch_size']}), {cfg.epochs} epochs; layer {layer}, pool {cfg.pool}, final norm {cfg.final_norm}.\n\n"
            f"| metric | value |\n|---|---|\n| top-1 (%), last epoch | {100 * s['top1']:.2f} |\n"
            f"| top-5 (%), last epoch | {100 * s['top5']:.2f} |\n"
            f"| best top-1 (%) | {100 * s['best_top1']:.2f} (epoch {s['best_epoch']}) |\n")
