"""The built-in demo's evaluation, before and after training (docs/training.md, "The built-in demo")."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..data.builtin import BuiltinDemoData
from .config import TrainConfig
from .rng import side_rng


def demo_evaluation(objective, source: BuiltinDemoData, cfg: TrainConfig, device: torch.device) -> Dict[str, Any]:
    """PSNR gain per task on held-out images and linear-probe accuracy on held-out digits.

    Returns ``{"psnr_gain_db": mean gain in dB over the tasks, "psnr_per_task": {task: {...}},
    "linprobe_acc": accuracy in [0, 1]}``. Leaves the training RNG streams untouched.
    """
    from ..eval.linprobe import linear_probe_accuracy
    from ..eval.psnr import mean_gain, psnr_gain

    model = objective.model
    with side_rng(device):
        per_task = psnr_gain(objective, source.held_out.restoration_images(), cfg.tasks, patch_size=model.patch_size,
                             params=cfg.task_params, device=device)
        probe = linear_probe_accuracy(model, source.train_digits, source.train_digit_labels,
                                      source.held_out.digits, source.held_out.digit_labels, device=device, seed=cfg.seed)
    return {"psnr_gain_db": mean_gain(per_task), "psnr_per_task": per_task, "linprobe_acc": probe["accuracy"]}


def compare_evaluations(init: Optional[Dict[str, Any]], final: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json's ``{"init", "pretrained"}`` pairs from two :func:`demo_evaluation` results (init may be empty)."""
    init = init or {}
    return {
        "psnr_gain_db": {"init": init.get("psnr_gain_db"), "pretrained": final["psnr_gain_db"]},
        "psnr_gain_db_per_task": {
            task: {"init": init.get("psnr_per_task", {}).get(task, {}).get("gain"), "pretrained": v["gain"]}
            for task, v in final["psnr_per_task"].items()},
        "linprobe_acc": {"init": init.get("linprobe_acc"), "pretrained": final["linprobe_acc"]},
    }
