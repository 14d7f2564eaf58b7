"""``summary.json`` (the outcome of a run) and the closing console lines."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from .. import distributed
from ..checkpoint import LAST
from ..files import atomic_write
from ..runlog import read_metrics

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def write_summary(output_dir: str, summary: Dict[str, Any]) -> None:
    """Rank 0 writes OUTPUT_DIR/summary.json atomically (other ranks: nothing)."""
    if distributed.is_main():
        text = json.dumps(summary, indent=2)
        atomic_write(os.path.join(output_dir, SUMMARY_FILE), lambda fh: fh.write(text.encode()))


def run_summary(state, total_steps: int, steps_per_epoch: int, *, device, loader: str, checkpoint: str,
                output_dir: str) -> Dict[str, Any]:
    """summary.json's fields as the loop leaves them (``state``: the run's LoopState), with
    :func:`metrics_summary`; the end adds its outputs, the wall time and the config."""
    summary: Dict[str, Any] = {
        "status": state.status, "step": state.step, "total_steps": total_steps,
        "epoch": state.step / steps_per_epoch, "device": str(device), "loader": loader,
        "num_threads": torch.get_num_threads(),
        "skipped_files": {"count": len(state.bad_files), "files": state.bad_files[:100]},
        "skipped_steps": state.skipped_steps, "checkpoint": checkpoint}
    summary.update(metrics_summary(output_dir))
    return summary


def metrics_summary(output_dir: str) -> Dict[str, Any]:
    """``final_loss`` and the median ``img_per_s`` of the run's metrics.jsonl (rank 0; elsewhere empty)."""
    records = read_metrics(output_dir) if distributed.is_main() else []
    if not records:
        return {}
    rates = [r["img_per_s"] for r in records if "img_per_s" in r]
    return {"final_loss": records[-1].get("loss"), "img_per_s": float(np.median(rates)) if rates else None}


def log_results(summary: Dict[str, Any], output_dir: str) -> None:
    """The closing lines: [demo] evaluation before/after, then status, step, wall time and where outputs are."""
    if "psnr_gain_db" in summary:
        p, acc = summary["psnr_gain_db"], summary["linprobe_acc"]
        log.info(f"psnr_gain_db: init {_fmt(p['init'])} -> pretrained {_fmt(p['pretrained'])} "
                 f"(held-out images, mean over tasks)")
        log.info(f"linprobe_acc: init {_fmt(acc['init'])} -> pretrained {_fmt(acc['pretrained'])} (held-out digits)")
    run_s, process_s = summary["wall_time_s"], summary.get("process_wall_time_s", summary["wall_time_s"])
    took = f"{run_s:.0f} s" if run_s - process_s < 1e-3 else f"{run_s:.0f} s ({process_s:.0f} s since the resume)"
    log.info(f"done: {summary['status']} at step {summary['step']} in {took}; outputs in {output_dir}")


def interrupted_before_training(cfg, name: str, step: int = 0, resumed_from: Optional[str] = None) -> Dict[str, Any]:
    """A stop signal (``name``: SIGTERM/SIGINT) before the first training step: one line, and summary.json
    (status ``interrupted_*``, ``trained_steps`` 0) if the output folder exists. ``step``: the step of
    the checkpoint the run had resumed from (0: none). summary.json is left alone when the run was to
    resume a checkpoint it had not loaded yet (the folder's summary still describes that checkpoint)."""
    status = f"interrupted_{name or 'signal'}".lower()
    kept = f"{resumed_from} is unchanged" if resumed_from else "no checkpoint written"
    log.warning(f"received {name or 'a stop request'} during start-up: nothing was trained yet ({kept})")
    summary = {"status": status, "step": step, "trained_steps": 0, "phase": "start-up", "config": cfg.to_dict()}
    unloaded = cfg.resume is not None and not resumed_from and (
        cfg.resume != "auto" or os.path.exists(os.path.join(cfg.output_dir, LAST)))
    if os.path.isdir(cfg.output_dir) and not unloaded:
        write_summary(cfg.output_dir, summary)
    return summary


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
