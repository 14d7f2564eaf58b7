"""A training run's checkpoint: its contents, the collective save, the resume check.

The file I/O (atomic write, format marker, loading, ``--resume auto``) is :mod:`fastebm.checkpoint`.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from .. import distributed
from ..checkpoint import save_checkpoint
from ..files import atomic_write
from ..data.sampling import BatchPlan
from ..errors import TrainingDiverged
from .config import TrainConfig
from .rng import capture_rng_state
from .state import LoopState

log = logging.getLogger(__name__)

# Config keys that may differ between a checkpoint and the run resuming it without changing the run.
RESUME_FREE_KEYS = {"dist_backend", "dist_timeout", "fsdp", "max_steps", "resume", "output_dir", "log_every",
                    "save_every", "grid_every", "num_workers", "demo_eval", "device", "strict_data", "max_bad_steps",
                    "attn_backend", "data", "loader", "save_ckpt_freq", "overwrite", "threads"}

EPOCH_CHECKPOINT = "checkpoint-{epoch}.pt"  # --save_ckpt_freq: the state after that many epochs


def checkpoint_state(cfg: TrainConfig, model_sd: Dict, optim_sd: Dict, scaler_sd: Dict, state: LoopState,
                     plan: BatchPlan, schedule: Dict, rng_per_rank: List[Dict], wall_time_s: float = 0.0) -> Dict[str, Any]:
    """The plain dict saved as ``last.pt`` (format: docs/design.md §9 and docs/training.md).
    ``wall_time_s``: seconds the run has taken up to this save, over all its processes."""
    epoch = state.step // plan.steps_per_epoch
    return {
        "model": model_sd,
        "optimizer": optim_sd,
        "scaler": scaler_sd,
        "step": state.step,
        "epoch": epoch,
        "data_position": {"epoch": epoch,
                          "micro_batch": (state.step % plan.steps_per_epoch) * plan.accum_iter,
                          "num_samples": plan.num_samples},
        "schedule": dict(schedule),
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,  # every process's streams, restored per rank on resume
        "config": cfg.to_dict(),
        "bad_files": list(state.bad_files),
        "skipped_steps": list(state.skipped_steps),
        "eval_init": state.eval_init,
        "world_size": plan.world_size,
        "wall_time_s": float(wall_time_s),
    }


def saved_config(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint's config with ``img_size`` explicit: checkpoints written before vit_demo pretrained at
    16 px by default saved ``None`` for "the preset's img_size" (32 for vit_demo)."""
    from ..models import PRESETS

    saved = dict(ckpt.get("config") or {})
    if saved.get("img_size") is None and saved.get("model") in PRESETS:
        saved["img_size"] = PRESETS[saved["model"]]["img_size"]
    return saved


def check_resume_config(ckpt: Dict[str, Any], cfg: TrainConfig, path: str, world_size: int) -> None:
    """Warns when the resuming run changes settings (or the process count) that make it a different run."""
    saved = saved_config(ckpt)
    changed = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS and saved.get(k) != v}
    if changed:
        pretty = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        log.warning(f"resuming {path} with changed settings ({pretty}); the run is no longer the same run")
    if ckpt.get("world_size", world_size) != world_size:
        log.warning(f"{path} was written by {ckpt.get('world_size')} process(es), this job has {world_size}: "
                    f"the global batch and learning rate change, and each rank's RNG streams restart from rank 0's")


def save_collective(cfg: TrainConfig, objective, optimizer, scaler, state: LoopState, plan: BatchPlan,
                    schedule: Dict, wall_time_s: float = 0.0) -> Optional[str]:
    """Rank 0 writes last.pt, once; never a checkpoint of non-finite weights. Returns its path on rank 0.

    Collective: every rank calls it at the same step (FSDP2 gathers the sharded state, every rank's
    RNG state and unreadable-file list are collected into ``state``), and all pass a barrier after
    the write. Raises TrainingDiverged (on every rank) when any parameter is non-finite.
    """
    rng_per_rank = distributed.all_gather_object(capture_rng_state())
    if distributed.world_size() > 1:
        merged = [f for files in distributed.all_gather_object(state.bad_files) for f in files]
        state.bad_files = list(dict.fromkeys(merged))
    model_sd, optim_sd = distributed.gather_for_checkpoint(objective, optimizer)
    bad = [n for n, v in model_sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if distributed.any_rank(bool(bad)):
        raise TrainingDiverged(f"refusing to checkpoint non-finite parameters ({bad[:3]}...) at step {state.step}")
    path = None
    if distributed.is_main():
        path = save_checkpoint(checkpoint_state(cfg, model_sd, optim_sd, scaler.state_dict(), state, plan, schedule,
                                                rng_per_rank, wall_time_s), cfg.output_dir)
    distributed.barrier()
    return path


def keep_epoch_checkpoint(last_path: str, epoch: int) -> str:
    """``--save_ckpt_freq``: keeps the just-written ``last.pt`` as ``checkpoint-{epoch}.pt`` beside it.

    A hard link (no copy: ``last.pt`` is later replaced by a rename, so the link keeps this
    content), or a copy where the file system has no hard links; either appears under its name
    only when complete. Returns the new path.
    """
    target = os.path.join(os.path.dirname(last_path), EPOCH_CHECKPOINT.format(epoch=epoch))
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.link(last_path, tmp)
        os.replace(tmp, target)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)

        def copy(fh):
            with open(last_path, "rb") as src:
                shutil.copyfileobj(src, fh)

        atomic_write(target, copy)  # OutputError naming target if that fails too
    return target
