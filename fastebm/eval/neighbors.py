"""``fastebm-eval knn``: weighted k-nearest-neighbour classification of frozen features.

DINO's protocol (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers", section 4.1 and its ``eval_knn.py``): features are L2-normalised, the k training
features with the highest cosine similarity to a test feature vote for their labels with weight
``exp(cosine / T)``, and the class with the largest summed weight is the prediction (top-5: the
five largest). Defaults k = 20, T = 0.07. The table and the plot also sweep ``--k_sweep``.
"""
from __future__ import annotations

import os
from typing import Dict, Sequence

import torch

from .features import frozen_features
from .runio import base_summary, finish, plot_curves, what_line

PLOT_FILE = "knn_accuracy.png"


def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                 ks: Sequence[int], temperature: float, chunk: int = 1024) -> Dict[int, torch.Tensor]:
    """{k: class scores (M, C)} of weighted k-NN for each k; features need not be normalised (done here).

    Neighbours are ranked by cosine similarity; a neighbour's vote is ``exp(sim / temperature)``.
    ``k`` larger than the training set is clipped to its size.
    """
    train_n = torch.nn.functional.normalize(train_f.float(), dim=1)
    test_n = torch.nn.functional.normalize(test_f.float(), dim=1)
    kmax = min(max(ks), len(train_n))
    scores = {k: [] for k in ks}
    for start in range(0, len(test_n), chunk):
        sim = test_n[start:start + chunk] @ train_n.T
        top_sim, top_idx = sim.topk(kmax, dim=1)  # sorted, largest first
        votes = torch.nn.functional.one_hot(train_y[top_idx], num_classes).float() * (top_sim / temperature).exp().unsqueeze(-1)
        for k in ks:
            scores[k].append(votes[:, :min(k, kmax)].sum(1))
    return {k: torch.cat(v) for k, v in scores.items()}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    hit = (scores.topk(k, dim=1).indices == labels.unsqueeze(1)).any(1)
    return float(hit.float().mean())


def run_knn(cfg) -> Dict:
    """Runs ``fastebm-eval knn`` with a checked :class:`~fastebm.eval.config.KnnConfig`; returns the summary."""
    run, bb, data, layer, (f_tr, y_tr), (f_va, y_va) = frozen_features(
        "knn", cfg, f"k {cfg.k}, T {cfg.temperature}", cfg.batch_size)
    try:
        ks = sorted(set(list(cfg.k_sweep) + [cfg.k]))
        scores = knn_classify(f_tr, y_tr, f_va, data.num_classes, ks, cfg.temperature)
        sweep = [{"k": k, "top1": topk_accuracy(scores[k], y_va, 1), "top5": topk_accuracy(scores[k], y_va, 5)} for k in ks]
        best = next(r for r in sweep if r["k"] == cfg.k)
        summary = base_summary(run, cfg, bb, data)
        summary.update({"top1": best["top1"], "top5": best["top5"], "k": cfg.k, "temperature": cfg.temperature,
                        "layer": layer, "pool": cfg.pool, "final_norm": cfg.final_norm, "sweep": sweep,
                        "effective_k_max": min(max(ks), len(f_tr))})
        if run.is_main:
            from ..runlog import MetricsLogger

            logger = MetricsLogger(cfg.output_dir)
            for r in sweep:
                logger.log({"step": r["k"], "k": r["k"], "top1": r["top1"], "top5": r["top5"]})
            logger.close()
        rows = "\n".join(f"| {r['k']} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} |" for r in sweep)
        table = (f"# k-NN ({what_line(summary)})\n\nLayer {layer}, pool {cfg.pool}, final norm {cfg.final_norm}, "
                 f"T {cfg.temperature}; **top-1 {100 * best['top1']:.2f} % at k = {cfg.k}**.\n\n"
                 f"| k | top-1 (%) | top-5 (%) |\n|---|---|---|\n{rows}\n")
        plot = (PLOT_FILE, lambda fh: plot_curves(fh, [r["k"] for r in sweep], {"top-1": [r["top1"] for r in sweep]},
                                                   "k (neighbours)", f"k-NN accuracy, T={cfg.temperature}", logx=True))
        summary = finish(run, cfg, summary, table, plot)
        run.say(f"knn: top-1 {100 * best['top1']:.2f} %, top-5 {100 * best['top5']:.2f} % (k {cfg.k}); "
                f"outputs in {os.path.abspath(cfg.output_dir)}")
        return summary
    finally:
        run.close()
