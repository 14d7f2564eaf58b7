"""``fastebm-eval linprobe``: a linear classifier on frozen features, MAE's protocol.

MAE (He et al. 2022, appendix A.2, ``main_linprobe.py``): the head is ``BatchNorm1d(D,
affine=False, eps=1e-6)`` followed by a linear layer initialised with trunc_normal(std 0.01);
LARS (timm's ``Lars``, trust coefficient 0.001) with weight decay 0, lr = blr * batch / 256,
linear warm-up then cosine decay per iteration (timm's ``CosineLRScheduler``). MAE's LARS adapts
every tensor with more than one dimension and leaves biases alone, whatever the weight decay:
here the weight's parameter group has ``always_adapt=True`` and the bias's ``False``.

Difference from MAE: the backbone is frozen and deterministic, so the features are computed once
(resize + centre crop, no training augmentation) and the head trains on the cached features,
which makes a 90-epoch probe take seconds on small data. On the built-in digits the probe is a
fixed number of steps whatever the number of labels (:func:`~fastebm.eval.recipes.resolve_probe_schedule`).

:func:`fold_head` turns the trained head into one linear layer (the BatchNorm's running statistics
folded in). ``fastebm-eval finetune --head_init probe`` (LP-FT) loads :func:`logistic_head`'s probe.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
import torch.nn as nn

from ..data.sampling import generator_for
from .features import extract, frozen_features
from .neighbors import topk_accuracy
from .recipes import resolve_probe_schedule
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


@torch.no_grad()
def fold_head(head: nn.Sequential) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)), float32, of one linear layer computing ``head`` in eval mode.

    ``head`` is :func:`make_head`'s ``BatchNorm1d(affine=False)`` + ``Linear``; in eval mode the norm
    is ``(f - running_mean) / sqrt(running_var + eps)``, so ``W' = W / sqrt(var + eps)`` (per input
    feature) and ``b' = b - W' @ running_mean``.
    """
    norm, linear = head[0], head[1]
    inv_std = (norm.running_var.double() + norm.eps).rsqrt()
    w = linear.weight.double() * inv_std.unsqueeze(0)
    b = linear.bias.double() - w @ norm.running_mean.double()
    return w.float(), b.float()


def probe_steps(cfg, n_train: int) -> Tuple[int, int]:
    """(batch, steps per epoch) of a probe on ``n_train`` features (drop_last, as MAE)."""
    batch = min(cfg.batch_size, n_train)
    return batch, n_train // batch


def train_head(cfg, f_tr, y_tr, f_va, y_va, num_classes: int, log=None):
    """Trains MAE's probe head on cached features; returns (head, settings used, per-epoch history)."""
    torch.manual_seed(cfg.seed)
    head = make_head(f_tr.shape[1], num_classes, cfg.head_init_std, cfg.seed)
    batch, steps = probe_steps(cfg, len(f_tr))
    resolve_probe_schedule(cfg, steps)
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
    return head, {"lr": lr, "batch_size": batch, "steps_per_epoch": steps, "epochs": cfg.epochs}, history


LPFT_C = 1.0  # inverse L2 strength of LP-FT's logistic regression (scikit-learn's default; fastebm's demo probe)


def logistic_head(f_tr: torch.Tensor, y_tr: torch.Tensor, num_classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)), float32: a multinomial logistic regression on standardised features
    (scikit-learn ``StandardScaler`` + ``LogisticRegression(C=LPFT_C)``), folded into one linear layer
    on the raw features: ``W' = W / scale``, ``b' = b - W' @ mean``. Two classes (scikit-learn fits one
    logit) become the equivalent pair ``(-z/2, z/2)``. Raises UsageError when a class has no image."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from ..errors import UsageError

    x, y = f_tr.double().numpy(), y_tr.numpy()
    if sorted(set(y.tolist())) != list(range(num_classes)):
        raise UsageError(f"--head_init probe needs training images of every class; the labelled set has classes "
                         f"{sorted(set(y.tolist()))} of {num_classes}")
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=LPFT_C, max_iter=5000, random_state=seed).fit(scaler.transform(x), y)
    coef, bias = clf.coef_, clf.intercept_
    if num_classes == 2:
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    w = coef / scaler.scale_[None]
    b = bias - w @ scaler.mean_
    return torch.from_numpy(w).float(), torch.from_numpy(b).float()


def fit_probe_head(run, ft_cfg, model, train_ds, val_ds, workers: int) -> Dict:
    """LP-FT's first stage: ``model.head`` <- a linear probe of the frozen ``model`` (returns its record).

    LP-FT (Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features and
    Underperform Out-of-Distribution", ICLR 2022, section 3): fit a logistic-regression probe on
    the pretrained features, then fine-tune everything starting from that head, so the first
    fine-tuning steps do not push the backbone with the gradients of a random head. The probe is
    theirs (an L2-regularised logistic regression, :func:`logistic_head`), not MAE's LARS head: that
    one has no weight decay and on a few separable labels grows without bound (logits of ~1e4 on
    100 digits), which saturates the fine-tuning loss. Features: what the classifier pools
    (``global_pool`` avg: mean of the normed patch tokens; token: the class token) of ``train_ds``
    (the labelled training images through the evaluation transform). ``val_ds`` only scores the
    probe (``top1``: this linear probe on the same labels). Collective under torchrun (feature
    extraction); every rank fits the same head, and DDP starts from rank 0's weights anyway.
    """
    pool = "avg" if ft_cfg.global_pool == "avg" else "cls"
    kw = dict(layer=len(model.blocks), pool=pool, final_norm=True, batch_size=max(64, ft_cfg.batch_size), workers=workers)
    f_tr, y_tr = extract(run, model, train_ds, **kw)
    f_va, y_va = extract(run, model, val_ds, **kw)
    w, b = logistic_head(f_tr, y_tr, model.head.out_features, ft_cfg.seed)
    scores = f_va @ w.T + b
    with torch.no_grad():
        model.head.weight.copy_(w.to(model.head.weight))
        model.head.bias.copy_(b.to(model.head.bias))
    return {"top1": topk_accuracy(scores, y_va, 1), "top5": topk_accuracy(scores, y_va, 5),
            "train_top1": topk_accuracy(f_tr @ w.T + b, y_tr, 1), "pool": pool, "C": LPFT_C}


def run_linprobe(cfg) -> Dict:
    """Runs ``fastebm-eval linprobe`` with a checked :class:`~fastebm.eval.config.LinprobeConfig`."""
    run, bb, data, layer, (f_tr, y_tr), (f_va, y_va) = frozen_features(
        "linprobe", cfg, lambda: f"{cfg.opt}, {cfg.epochs} epochs on cached features", max(64, min(cfg.batch_size, 1024)),
        prepare=lambda data: resolve_probe_schedule(cfg, probe_steps(cfg, len(data.train))[1]))
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
