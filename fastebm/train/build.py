"""What a training run is made of, built from its config: objective, data, preview set, precision.

Bad combinations fail here, before the first step, with a :class:`~fastebm.errors.UsageError`
naming the flags involved.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch

from .. import create_model, distributed
from ..corrupt import prepare_batch
from ..data.builtin import BuiltinDemoData
from ..data.folder import ImageFolderData
from ..data.sampling import BatchPlan
from ..data.streams import build_stream, folder_index
from ..errors import UsageError
from ..models import pretrain_img_size
from ..restore import RestorationObjective
from .config import TrainConfig
from .rng import side_rng

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8


def build_objective(cfg: TrainConfig) -> RestorationObjective:
    """The ``RestorationObjective`` around a fresh model; UsageError for settings it refuses."""
    # The func engine is correct only with math attention (docs/design.md §4): under it, "auto" means
    # math rather than the fused kernel that auto picks on CUDA; an explicit "triton" is still refused below.
    attn_backend = "math" if cfg.engine == "func" and cfg.attn_backend == "auto" else cfg.attn_backend
    try:
        model = create_model(cfg.model, img_size=cfg.img_size or pretrain_img_size(cfg.model), energy=cfg.energy, attn_backend=attn_backend)
    except ValueError as exc:
        raise UsageError(f"--model {cfg.model} / --img_size {cfg.img_size}: {exc}") from None
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    kw = {} if cfg.alpha_init is None else {"alpha_init": cfg.alpha_init}
    try:
        return RestorationObjective(model, steps=cfg.steps, grad_mode=cfg.grad_mode, noise_sigma=cfg.noise_sigma,
                                    engine=cfg.engine, **kw)
    except ValueError as exc:
        raise UsageError(f"objective settings (--engine {cfg.engine}, --steps, --grad_mode, --alpha_init): {exc}") from None


def check_corruption(cfg: TrainConfig, img_size: int, patch_size: int) -> None:
    """Task/geometry mismatches (e.g. --img_size not a multiple of the sr factor) fail now, not at step 0."""
    probe = torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)
    for task in cfg.tasks:
        try:
            prepare_batch(probe, [task], seed=0, patch_size=patch_size, params=cfg.task_params, backend="reference")
        except ValueError as exc:
            raise UsageError(f"--tasks {task} with --img_size {img_size}: {exc}") from None


def build_data(cfg: TrainConfig, img_size: int) -> Union[BuiltinDemoData, ImageFolderData]:
    """The built-in demo data without ``--data``, else the image folder (DataError if unusable)."""
    if cfg.data is None:
        return BuiltinDemoData(img_size, cfg.seed)
    source = ImageFolderData(cfg.data, img_size, cfg.seed, exclude=cfg.output_dir)  # a run's own pictures are never data
    source.check_readable()
    return source


def batch_plan(cfg: TrainConfig, num_samples: int, world_size: int, rank: int) -> BatchPlan:
    """This rank's share of every global batch; UsageError when the data cannot fill one optimiser step."""
    plan = BatchPlan(num_samples, cfg.batch_size, cfg.accum_iter, world_size, rank, cfg.seed)
    if plan.steps_per_epoch < 1:
        raise UsageError(f"the data has {num_samples} images, fewer than one optimiser step needs "
                         f"(batch_size {cfg.batch_size} x accum_iter {cfg.accum_iter} x {world_size} process(es)); "
                         f"lower --batch_size or --accum_iter")
    return plan


def num_workers(cfg: TrainConfig, source) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    if isinstance(source, BuiltinDemoData):
        return 0  # in memory already; worker start-up would cost more than it saves
    return min(8, os.cpu_count() or 1)


def micro_batch_stream(cfg: TrainConfig, loader: str, source, plan: BatchPlan, device: torch.device):
    """The micro-batch stream of the resolved ``loader`` (``torch`` DataLoader, or ``dali`` after its file index).

    DALI: rank 0 checks every file once (``folder_index``, cached), then the other ranks read its
    cache (other nodes may build their own). Collective (a barrier bounded by --dist_timeout).
    """
    workers = num_workers(cfg, source)
    index = None
    if loader == "dali":
        if distributed.is_main():
            index = folder_index(source, workers, output_dir=cfg.output_dir)
        distributed.barrier()
        if not distributed.is_main():
            index = folder_index(source, workers, output_dir=cfg.output_dir)
        log.info(f"--loader dali: {index.summary()}")
    return build_stream(loader, source, plan, device, workers, index, cfg.output_dir)


def preview_images(source, n: int = PREVIEW_IMAGES) -> torch.Tensor:
    """A fixed small set for the restoration grid: held-out images for the demo, first readable files otherwise."""
    if isinstance(source, BuiltinDemoData):
        h = source.held_out
        half = n // 2
        return torch.cat([h.digits[:half], h.photos[: n - half]]) if len(h.photos) else h.digits[:n]
    images = []
    for index in range(len(source)):
        try:
            images.append(source.load(index, 0)[0])
        except Exception:  # unreadable: counted by the loader, just not shown
            continue
        if len(images) == n:
            break
    return torch.stack(images)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """``--precision`` -> the autocast dtype (None: fp32, no autocast); auto = bf16 on CUDA, fp32 on CPU."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def plain_objective(cfg: TrainConfig, objective, device: torch.device):
    """An unsharded objective for rank-0-only work (pictures, export, evaluation).

    Without FSDP2 that is the objective itself. FSDP2 parameters are DTensors whose every use is a
    collective, so every rank gathers the full weights (collective: every rank must call this) and
    rank 0 loads them into a plain copy.
    """
    if not distributed.is_sharded(objective):
        return objective
    state = distributed.full_state_dict(objective)
    if not distributed.is_main():
        return objective
    with side_rng(device):  # building a model draws initial weights: keep the training RNG streams
        plain = build_objective(cfg).to(device)
    plain.load_state_dict(state)
    return plain
