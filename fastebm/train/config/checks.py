"""Checks of a :class:`~.fields.TrainConfig` that argparse's types cannot make.

Each raises :class:`~fastebm.errors.UsageError` with one line naming the flag and the fix, before
anything is read or written. :func:`validate` also normalises a few values in place (task list,
``--clip_grad 0``, ``--device``, ``--threads``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from ...corrupt import SAMPLE_TASKS
from ...errors import UsageError
from ...settings import check_device, check_seed
from .fields import TrainConfig


def resolve_lr(values: Dict[str, Any], on_command_line: set, in_file: set) -> None:
    """--lr (absolute) replaces the --blr scaling; both in one place is an error; the command line
    overrides the file (a command-line --blr drops the file's lr)."""
    for where, given in (("on the command line", on_command_line), ("in the config file", in_file)):
        if {"lr", "blr"} <= given and values["lr"] is not None:
            raise UsageError(f"--lr and --blr both given {where}: --lr sets the learning rate itself, --blr scales it "
                             f"with the batch (lr = blr * effective batch / 256); give one")
    if "blr" in on_command_line and "lr" not in on_command_line:
        values["lr"] = None


def split_tasks(tasks) -> List[str]:
    """``"mim,sr"``, ``["mim sr", "denoise"]`` ... -> lower-case task names in order."""
    out: List[str] = []
    for item in tasks if isinstance(tasks, (list, tuple)) else [tasks]:
        out.extend(t.strip().lower() for t in str(item).replace(",", " ").split() if t.strip())
    return out


def validate(cfg: TrainConfig) -> None:
    """Checks values that argparse's types cannot; raises UsageError naming the flag and the fix."""
    _check_model_and_tasks(cfg)
    _check_counts(cfg)
    _check_rates(cfg)
    _check_run(cfg)


def _check_model_and_tasks(cfg: TrainConfig) -> None:
    from ...models import PRESETS

    if cfg.model not in PRESETS:
        raise UsageError(f"--model: unknown preset {cfg.model!r}; choose from {', '.join(sorted(PRESETS))}")
    cfg.tasks = split_tasks(cfg.tasks)
    if "mix" in cfg.tasks:  # 'mix' = every task, as in fastebm.corrupt
        cfg.tasks = list(SAMPLE_TASKS)
    if not cfg.tasks:
        raise UsageError("--tasks is empty; give one or more of " + ", ".join(SAMPLE_TASKS))
    bad = [t for t in cfg.tasks if t not in SAMPLE_TASKS]
    if bad:
        raise UsageError(f"--tasks: unknown task(s) {bad}; choose from " + ", ".join(SAMPLE_TASKS))


def _check_counts(cfg: TrainConfig) -> None:
    """Step, batch and size counts, and --img_size against the preset's patch size."""
    from ...models import PRESETS, pretrain_img_size

    positive = ["batch_size", "accum_iter", "epochs", "steps", "log_every", "max_bad_steps"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    for name in ["save_every", "grid_every"]:
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be >= 0 (0 = only at the end; got {getattr(cfg, name)})")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UsageError(f"--max_steps must be >= 1 or none (got {cfg.max_steps})")
    if cfg.img_size is None:  # resolved here so that config.yaml and the checkpoint record the size trained at
        cfg.img_size = pretrain_img_size(cfg.model)
    if cfg.img_size < 1:
        raise UsageError(f"--img_size must be a positive number of pixels (got {cfg.img_size})")
    patch = PRESETS[cfg.model]["patch_size"]
    if cfg.img_size % patch:
        lo = max(patch, cfg.img_size // patch * patch)
        raise UsageError(f"--img_size {cfg.img_size} is not a multiple of {cfg.model}'s patch size {patch}; "
                         f"use e.g. {lo} or {lo + patch}")


def _check_rates(cfg: TrainConfig) -> None:
    """Learning rates, schedule lengths, step sizes, mask ratio, clipping."""
    for name in ["blr", "min_lr", "weight_decay", "warmup_epochs", "noise_sigma"]:
        v = getattr(cfg, name)
        if not (v >= 0) or v != v or v == float("inf"):
            raise UsageError(f"--{name} must be a finite number >= 0 (got {v})")
    if cfg.blr == 0:
        raise UsageError("--blr must be > 0")
    if cfg.lr is not None and not (0 < cfg.lr < float("inf")):
        raise UsageError(f"--lr must be a finite number > 0, or none to use --blr (got {cfg.lr})")
    if cfg.save_ckpt_freq < 0:
        raise UsageError(f"--save_ckpt_freq must be >= 0 epochs (0 = off; got {cfg.save_ckpt_freq})")
    if cfg.warmup_epochs > cfg.epochs:
        raise UsageError(f"--warmup_epochs ({cfg.warmup_epochs}) exceeds --epochs ({cfg.epochs})")
    if cfg.alpha_init is not None and not (cfg.alpha_init > 0 and cfg.alpha_init != float("inf")):
        raise UsageError(f"--alpha_init must be a finite number > 0 (got {cfg.alpha_init})")
    if not (0.0 < cfg.mask_ratio < 1.0):
        raise UsageError(f"--mask_ratio must be between 0 and 1 exclusive (got {cfg.mask_ratio})")
    if cfg.clip_grad is not None:
        if cfg.clip_grad < 0 or cfg.clip_grad != cfg.clip_grad:
            raise UsageError(f"--clip_grad must be >= 0 (0 or none = off; got {cfg.clip_grad})")
        if cfg.clip_grad == 0:
            cfg.clip_grad = None


def _check_run(cfg: TrainConfig) -> None:
    check_seed(cfg.seed)
    """Workers, device, threads, resume/overwrite, output folder, loader, process-group timeout."""
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0 (got {cfg.num_workers})")
    cfg.device = check_device(cfg.device)
    threads = str(cfg.threads).strip().lower()
    if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
        raise UsageError(f"--threads must be auto or a whole number >= 1 (got {cfg.threads!r})")
    cfg.threads = threads
    if cfg.resume is not None and cfg.resume != "auto" and os.path.isdir(cfg.resume):
        from ...checkpoint import LAST, PREVIOUS, folder_hint

        run = any(os.path.isfile(os.path.join(cfg.resume, n)) for n in (LAST, PREVIOUS))
        also = f" (or --resume auto --output_dir {cfg.resume} to continue the run in it)" if run else ""
        raise UsageError(f"--resume: checkpoint {cfg.resume!r} is a folder; {folder_hint(cfg.resume)}{also}")
    if cfg.resume is not None and cfg.resume != "auto" and not os.path.isfile(cfg.resume):
        raise UsageError(f"--resume: checkpoint {cfg.resume!r} does not exist (give a file or 'auto')")
    if cfg.resume is not None and cfg.overwrite:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the run in --output_dir, "
                         "--overwrite deletes it; give one")
    if not cfg.output_dir:
        raise UsageError("--output_dir must not be empty")
    check_loader(cfg)
    if cfg.dist_timeout is not None and not (0 < cfg.dist_timeout < float("inf")):
        raise UsageError(f"--dist_timeout must be a number of seconds > 0 (got {cfg.dist_timeout})")


def check_loader(cfg: TrainConfig) -> None:
    """``--loader dali`` needs an image folder and DALI installed: checked before anything is read or written."""
    if cfg.loader != "dali":
        return
    if cfg.data is None:
        raise UsageError("--loader dali: DALI reads image folders (--data DIR); the built-in data is in memory "
                         "already: use --loader torch or auto")
    from ...data.dali import require_dali

    require_dali()  # DaliUnavailable (a DataError, exit 2) naming the install command
