"""``fastebm-eval finetune``: end-to-end fine-tuning with MAE's recipe, built from timm's parts.

MAE (He et al. 2022, appendix A.1, ``main_finetune.py``): a timm ViT loaded from the backbone
with a new head (trunc_normal std 2e-5), AdamW through ``timm.optim.create_optimizer_v2`` with
layer-wise lr decay and no weight decay on norms, biases and embeddings; lr = blr * effective
batch / 256 with linear warm-up and per-iteration cosine decay (``timm.scheduler.
CosineLRScheduler``); ``timm.data.Mixup`` (Mixup 0.8, CutMix 1.0, label smoothing 0.1) with
``SoftTargetCrossEntropy`` (``LabelSmoothingCrossEntropy`` when Mixup/CutMix are off); RandAugment
and random erasing from ``timm.data.create_transform``; drop path; optional gradient clipping and
a weight EMA (``timm.utils.ModelEmaV3``). Top-1/top-5 on the validation set after every epoch.

The new head (``--head_init``): MAE's ``random`` (trunc_normal), ``zero``, or ``probe``: LP-FT
(Kumar et al., ICLR 2022), an L2-regularised logistic-regression probe fitted on the frozen
features of the same labelled images and loaded as the head before fine-tuning (:func:`fastebm.eval.probe.fit_probe_head`; the
built-in digits' default, docs/quality.md). Each epoch also records the training accuracy
(running, on the augmented batches in train mode; not with Mixup/CutMix, whose targets are mixed).

Exact resume: every epoch reseeds the global RNGs from (seed, epoch) and draws its data order from
its own generator, each training image's augmentation comes from (seed, epoch, image) in any loader
process (``datasets.LabelledImages``), and ``checkpoint.pt`` (model, optimiser, EMA, counters,
history) is written atomically after every evaluated epoch (``--eval_every``); so ``--max_epochs N``
then ``--resume auto`` reproduces an uninterrupted run bit for bit. SIGTERM/SIGINT stop at the next
step; the run resumes after the last saved epoch.

A resume continues the same run or none (:func:`resume_changes`): a setting that changes what the
run computes (the backbone, by the SHA-256 of its weights; ``--init``, ``--few_shot``, ``--seed``,
the data and its image counts, ``--model``/``--img_size``, the recipe, ``--epochs`` and every
optimisation or augmentation flag; the number of processes) that differs from the checkpoint's is
refused before anything is written, as is a checkpoint whose augmentation was drawn per loader
process (an earlier fastebm-eval's); ``--model``, ``--img_size``, the lr, ``--device`` and
``--precision`` are compared as they resolved (``run_identity``'s ``resolved``). Only
``_RESUME_QUIET`` (``--num_workers`` among them: each image's augmentation is drawn from (seed,
epoch, image)) and ``_RESUME_WARN`` may change; the latter are printed as a warning and listed in
``summary.json``'s ``resumes``. A resume with nothing left to train warns and writes nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import distributed
from ..checkpoint import pickled_objects, atomic_torch_save
from ..errors import TrainingDiverged, UsageError
from ..runlog import MetricsLogger
from ..signals import StopRequest
from .backbone import eval_size, pretrain_img_size, resolve_backbone, weights_fingerprint
from .config import to_dict
from .datasets import load_eval_data, make_transforms, with_transform
from .probe import fit_probe_head
from .recipes import resolve_blr, resolve_crop, resolve_schedule
from .runio import (CKPT_FILE, SUMMARY_FILE, EpochShuffle, ShardSampler, base_summary, finish, loader, num_workers, plot_curves,
                    prepare_output_dir, refuse_other_results, seed_epoch, start_run, sum_over_ranks, what_line)
from .timm_vit import build_classifier, check_img_size

log = logging.getLogger(__name__)

CKPT_FORMAT = "fastebm-eval-finetune"
PLOT_FILE = "accuracy.png"
# Settings a resume may change. Quiet: where the run stops, writes and waits, and how many loader processes
# read the images (each image's augmentation is drawn from (seed, epoch, index): datasets.LabelledImages);
# nothing it computes.
_RESUME_QUIET = {"resume", "max_epochs", "output_dir", "dist_timeout", "save_ckpt", "num_workers"}
# With a warning (and a record in summary.json's "resumes"): how the same run is computed and checked
# (hardware, arithmetic, validation cadence), not what it measures. Any other setting that differs is refused.
_RESUME_WARN = {"device", "precision", "eval_every"}
_PATH_KEYS = ("ckpt", "data", "train_dir", "val_dir")  # the same place spelled differently is the same setting
# Flags compared as the values they resolve to (run_identity's "resolved"), not as given: --model vit_demo
# and no --model are the same run when the backbone is a vit_demo; --lr 2.5e-4 and the --blr that gives it too.
_RESOLVED = {"model": "--model", "img_size": "--img_size", "lr": "lr (--blr/--lr)"}
# How each training image's augmentation is drawn; checkpoints without the record drew it per loader process.
AUGMENT_DRAWS = "per image: (seed, epoch, index)"
_RESOLVED_RAW = {"blr"}


def _check_batches(cfg, n_train: int, world: int) -> None:
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UsageError(f"--batch_size {cfg.batch_size} must be even with Mixup/CutMix (timm mixes pairs); "
                         f"use {cfg.batch_size + 1} or --mixup 0 --cutmix 0")
    if n_train < cfg.batch_size * world * cfg.accum_iter:
        raise UsageError(f"{n_train} training images are fewer than one optimiser step needs (batch_size "
                         f"{cfg.batch_size} x accum_iter {cfg.accum_iter} x {world} process(es)); lower --batch_size")


def _lr(cfg, world: int) -> float:
    """The peak lr a run uses: --lr, else blr * effective batch / 256 (after :func:`resolve_blr`)."""
    return float(cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size * cfg.accum_iter * world / 256)


def run_identity(run, cfg, bb, data) -> Dict[str, Any]:
    """What a fine-tuning run's checkpoint records beside its config, so that a resume can tell the same run
    from another: the backbone weights' SHA-256, the real paths of its inputs (symlinks resolved), the image
    counts, the number of processes, the device type and arithmetic actually used (``auto`` resolved), and
    under ``resolved`` the values the flags resolved to (model preset, evaluation size, peak lr, loader
    processes, device, arithmetic), and how the augmentation is drawn. ``_defaults`` (not saved) holds what
    an unset flag resolves to here, to compare a checkpoint written before ``resolved`` existed."""
    arith = "bf16" if run.autocast is not None else "fp32"
    random_init = cfg.init is not None
    return {"backbone_sha256": weights_fingerprint(bb.state),
            "abspaths": {k: os.path.realpath(getattr(cfg, k)) for k in _PATH_KEYS if getattr(cfg, k) is not None},
            "data_size": {"train_images": len(data.train), "val_images": len(data.val), "num_classes": data.num_classes},
            "world_size": run.world,
            "compute": f"{run.device.type}, {arith}",
            "augment_draws": AUGMENT_DRAWS,
            "resolved": {"model": bb.preset, "img_size": eval_size(cfg, bb), "lr": _lr(cfg, run.world),
                         "num_workers": num_workers(cfg, data.kind), "device": str(run.device), "precision": arith},
            "_defaults": {"model": "vit_demo" if random_init else bb.preset,
                          "img_size": pretrain_img_size(bb.preset) if random_init and bb.preset else bb.eval_img_size}}


def _same(old, new) -> bool:
    if isinstance(old, float) or isinstance(new, float):
        return old is not None and new is not None and math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0)
    return old == new


def _old_resolved(state: Dict[str, Any], identity: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint's flags resolved to: its record, or for one written before the record, its config
    with each unset flag filled as it resolves here (the backbone itself is compared separately)."""
    if state.get("resolved"):
        return state["resolved"]
    old, defaults = state["config"], identity.get("_defaults") or {}
    lr = None
    if old.get("lr") is not None or old.get("blr") is not None:
        lr = _lr(SimpleNamespace(lr=old.get("lr"), blr=old.get("blr"), batch_size=old.get("batch_size", 1),
                                 accum_iter=old.get("accum_iter", 1)), state.get("world_size") or 1)
    return {"model": old.get("model") if old.get("model") is not None else defaults.get("model"),
            "img_size": old.get("img_size") if old.get("img_size") is not None else defaults.get("img_size"),
            "lr": lr}


def resume_changes(state: Dict[str, Any], cfg, identity: Dict[str, Any]) -> Tuple[Dict[str, str], Dict[str, list]]:
    """Compares a checkpoint's run with the run that would continue it: ``(refused, allowed)``.

    ``refused``: setting -> "old -> new" for every difference that makes it another run; ``allowed``:
    setting -> [old, new] for the ``_RESUME_WARN`` settings (and a --ckpt path that names the same weights).
    A checkpoint written before a record existed is compared on what it has."""
    old_cfg, new_cfg = state["config"], to_dict(cfg)
    old_paths = state.get("abspaths") or {}
    old_sha, new_sha = state.get("backbone_sha256"), identity["backbone_sha256"]
    refused: Dict[str, str] = {}
    allowed: Dict[str, list] = {}
    resolved_old, resolved_new = _old_resolved(state, identity), identity["resolved"]
    recorded = bool(state.get("resolved"))
    for key, old in old_cfg.items():
        if key not in new_cfg or key in _RESUME_QUIET:
            continue
        if key in _RESOLVED:  # compared as resolved, not as given (blr: through the lr it gives)
            a, b = resolved_old.get(key), resolved_new.get(key)
            if not _same(a, b):
                refused[_RESOLVED[key]] = f"{a:.6g} -> {b:.6g}" if key == "lr" and a is not None else f"{a!r} -> {b!r}"
            continue
        if key in _RESOLVED_RAW:
            continue
        if recorded and key in ("device", "precision"):  # warned about as resolved: auto -> cpu is no change
            if resolved_old.get(key) != resolved_new.get(key):
                allowed[key] = [resolved_old.get(key), resolved_new.get(key)]
            continue
        new = new_cfg[key]
        old_place = old_paths.get(key)  # realpath; an older record holds an abspath: resolve its symlinks now
        same_place = (key in _PATH_KEYS and new is not None and old_place is not None
                      and os.path.realpath(old_place) == os.path.realpath(new))
        if new == old or same_place:
            continue
        if key == "ckpt" and old is not None and new is not None and old_sha is not None:
            continue  # both are files: their weights decide (below)
        if key in _RESUME_WARN:
            allowed[key] = [old, new]
        else:
            refused[f"--{key}"] = f"{old!r} -> {new!r}"
    if old_cfg.get("ckpt") is not None and cfg.ckpt is not None and old_sha is not None:
        if old_sha != new_sha:
            same_path = (old_cfg["ckpt"] == cfg.ckpt
                         or (old_paths.get("ckpt") is not None and os.path.realpath(old_paths["ckpt"]) == os.path.realpath(cfg.ckpt)))
            moved = "" if old_cfg["ckpt"] == cfg.ckpt else f"{old_cfg['ckpt']!r} -> "
            why = "; overwritten by further training?" if same_path else ""
            refused["--ckpt"] = (f"{moved}{cfg.ckpt!r} holds other weights than the run started from "
                                 f"(sha256 {old_sha[:12]} -> {new_sha[:12]}{why})")
        elif old_cfg["ckpt"] != cfg.ckpt and os.path.realpath(old_paths.get("ckpt") or old_cfg["ckpt"]) != os.path.realpath(cfg.ckpt):
            allowed["ckpt"] = [old_cfg["ckpt"], cfg.ckpt]  # another file with the same weights
    old_size, new_size = state.get("data_size"), identity["data_size"]
    if old_size and old_size != new_size and not any(f"--{k}" in refused for k in ("data", "train_dir", "val_dir", "few_shot")):
        def size(d):
            return f"{d['train_images']} train / {d['val_images']} val images in {d['num_classes']} classes"
        refused["the data"] = f"{size(old_size)} -> {size(new_size)}"
    if not recorded and state.get("compute") not in (None, identity["compute"]):
        allowed["compute"] = [state["compute"], identity["compute"]]  # e.g. --device auto on another machine
    old_world = state.get("world_size")
    if old_world is not None and old_world != identity["world_size"]:
        refused["processes"] = f"{old_world} -> {identity['world_size']} (the global batch and lr change)"
    return refused, allowed


def _load_resume(cfg, identity: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The checkpoint ``--resume`` names (None: start a new run), with ``resumes`` extended by this resume.

    Raises UsageError when OUTPUT_DIR holds a run and --resume is not given, when the file cannot be read
    or is not a fine-tuning checkpoint, or when a setting that changes the run differs from the
    checkpoint's (:func:`resume_changes`; one line naming each, old -> new). Warns about the allowed changes."""
    if cfg.resume is None and os.path.isfile(os.path.join(cfg.output_dir, CKPT_FILE)):
        raise UsageError(f"--output_dir {cfg.output_dir} holds a fine-tuning run ({CKPT_FILE}): --resume auto continues "
                         "it; give another --output_dir (or delete that one) to start a new run")
    path = os.path.join(cfg.output_dir, CKPT_FILE) if cfg.resume == "auto" else cfg.resume
    if cfg.resume is None or not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a checkpoint, or another tool's pickle
        foreign = pickled_objects(path, exc)
        if foreign:
            raise UsageError(f"--resume {path} is not a fastebm-eval fine-tuning checkpoint (it holds pickled objects: "
                             f"{', '.join(foreign[:5])}); give the checkpoint.pt of a fastebm-eval finetune run") from None
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--resume {path} is unreadable, truncated or corrupt ({reason}); delete it to start the run "
                         f"over in {cfg.output_dir}, or give another --output_dir") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise UsageError(f"--resume {path} is not a fastebm-eval fine-tuning checkpoint")
    recorded = state["config"].get("recipe")  # None: a checkpoint from before --recipe
    if recorded not in (None, cfg.recipe):
        raise UsageError(f"--resume {path} was trained with --recipe {recorded}, and this run's recipe is {cfg.recipe}: "
                         f"give --recipe {recorded} to continue it (a folder gets imagenet unless told)")
    if state.get("augment_draws") != identity["augment_draws"]:
        raise UsageError(f"--resume {path} was written by an earlier fastebm-eval, which drew each image's augmentation "
                         f"in whichever loader process read it; this version draws it from (seed, epoch, image), so the "
                         f"resumed epochs would not continue that run: start a new run in another --output_dir")
    refused, allowed = resume_changes(state, cfg, identity)
    if refused:
        pretty = ", ".join(f"{k}: {v}" for k, v in refused.items())
        hint = ("; to stop early and continue later, keep --epochs and give --max_epochs"
                if "--epochs" in refused else "")
        raise UsageError(f"--resume {path}: refusing to continue that run with changed settings ({pretty}): they change "
                         f"what it measures; give the same flags to continue it, or a new --output_dir to start "
                         f"another run{hint}")
    state["path"] = path
    if _nothing_to_train(cfg, state):
        state["nothing_to_train"] = True
        return state
    if allowed:
        pretty = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in allowed.items())
        log.warning(f"resuming {path} with changed settings ({pretty}); allowed, as they do not change what the run "
                    f"measures (summary.json lists them under 'resumes')")
    state["resumes"] = list(state.get("resumes") or []) + [{"after_epoch": int(state["epoch"]), "changed": allowed}]
    state["path"] = path
    return state


def _criterion(cfg, mixup_on: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_on:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss()


def _mixup(cfg, num_classes: int):
    from timm.data import Mixup

    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                 mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=num_classes)


def _scheduler(optimizer, cfg, steps_per_epoch: int):
    from timm.scheduler import CosineLRScheduler

    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
                              warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    sched.step_update(0)  # applies each group's lr_scale (layer decay) from the very first step
    return sched


@torch.no_grad()
def evaluate(run, model, dataset, batch_size: int, workers: int) -> Dict[str, float]:
    """Top-1/top-5 (fractions) and cross-entropy over the whole validation set, exact under torchrun."""
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # correct@1, correct@5, loss sum, count
    for x, y in loader(dataset, batch_size, ShardSampler(len(dataset), run.rank, run.world), workers, run.device):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with run.autocast_ctx():
            out = model(x)
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        sums[0] += float((top[:, 0] == y).sum())
        sums[1] += float((top == y.unsqueeze(1)).any(1).sum())
        sums[2] += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
        sums[3] += len(y)
    c1, c5, loss, n = sum_over_ranks(sums)
    return {"top1": c1 / n, "top5": c5 / n, "loss": loss / n}


class _Trainer:
    """The state of one fine-tuning run and its epoch step (model, optimiser, schedule, EMA)."""

    def __init__(self, run, cfg, model, num_classes: int, steps_per_epoch: int):
        from timm.optim import create_optimizer_v2

        self.run, self.cfg, self.model = run, cfg, model
        self.lr = _lr(cfg, run.world)
        self.optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay,
                                             layer_decay=None if cfg.layer_decay >= 1 else cfg.layer_decay)
        self.scheduler = _scheduler(self.optimizer, cfg, steps_per_epoch)
        self.mixup = _mixup(cfg, num_classes)
        self.criterion = _criterion(cfg, self.mixup is not None)
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
        self.wrapped = distributed.wrap_ddp(model, run.device, find_unused_parameters=False) if run.world > 1 else model
        self.updates = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.probe: Optional[Dict[str, Any]] = None  # LP-FT's probe record (--head_init probe)
        self.identity: Dict[str, Any] = {}  # run_identity(): what a resume compares besides the config
        self.resumes: List[Dict[str, Any]] = []  # one record per resume: after which epoch, what changed

    def state(self, epoch: int, history: List[Dict]) -> Dict[str, Any]:
        return {"format": CKPT_FORMAT, "version": 1, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
                "epoch": epoch, "updates": self.updates, "history": history, "config": to_dict(self.cfg),
                "probe": self.probe, **{k: v for k, v in self.identity.items() if not k.startswith("_")},
                "resumes": self.resumes}

    def load(self, state: Dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UsageError(f"--resume {state['path']} does not fit this model/optimiser: {' '.join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]}") from None
        self.updates = int(state["updates"])
        self.probe = state.get("probe")
        self.resumes = list(state.get("resumes") or [])
        self.scheduler.step_update(self.updates)

    def train_epoch(self, epoch: int, batches, stop: StopRequest, console) -> Dict[str, float]:
        cfg, run = self.cfg, self.run
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, seen, correct, t0 = 0.0, 0, 0, time.time()
        for i, (x, y) in enumerate(batches):
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            sync = (i + 1) % cfg.accum_iter == 0
            with distributed.gradient_sync(self.wrapped, sync=sync):
                with run.autocast_ctx():
                    out = self.wrapped(x)
                    loss = self.criterion(out, y)
                if self.mixup is None:
                    correct += int((out.detach().argmax(1) == y).sum())
                if distributed.any_rank(not math.isfinite(float(loss.detach()))):  # every rank stops together
                    raise TrainingDiverged(f"non-finite loss at epoch {epoch}, step {i}; lower --blr or set --clip_grad")
                (loss / cfg.accum_iter).backward()
            total, seen = total + float(loss.detach()) * len(x), seen + len(x)
            if sync:
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.updates += 1
                self.scheduler.step_update(self.updates)
                if self.ema is not None:
                    self.ema.update(self.model, step=self.updates)
                console.step()
            if distributed.any_rank(stop.requested):
                return {"stopped": True}
        avg = sum_over_ranks([total, seen, correct])
        stats = {"train_loss": avg[0] / max(avg[1], 1), "lr": max(g["lr"] for g in self.optimizer.param_groups),
                 "img_per_s": avg[1] / max(time.time() - t0, 1e-9)}
        if self.mixup is None:
            stats["train_top1"] = avg[2] / max(avg[1], 1)
        return stats


def run_finetune(cfg) -> Dict[str, Any]:
    """Runs ``fastebm-eval finetune`` with a checked :class:`~fastebm.eval.config.FinetuneConfig`; returns the summary.

    Raises UsageError before anything is written for a bad backbone, data or batch, and for a
    ``--resume`` that would change the run (:func:`_load_resume`); TrainingDiverged on a non-finite loss."""
    bb = resolve_backbone(cfg)
    img_size = eval_size(cfg, bb)
    check_img_size(bb.arch, img_size)
    data = load_eval_data(cfg, img_size)
    run = start_run("finetune", cfg)
    try:
        _check_batches(cfg, len(data.train), run.world)
        sampler = EpochShuffle(len(data.train), cfg.batch_size, run.rank, run.world, cfg.seed)
        steps_per_epoch = len(sampler) // cfg.batch_size // cfg.accum_iter
        resolve_schedule(cfg, steps_per_epoch, len(data.train), data.num_classes)
        resolve_crop(cfg, len(data.train), data.num_classes)
        resolve_blr(cfg, len(data.train), data.num_classes)
        identity = run_identity(run, cfg, bb, data)
        refuse_other_results("finetune", cfg.output_dir)  # before a resume with nothing to train answers for it
        resume = _load_resume(cfg, identity)  # every input is checked before anything is written
        if resume is not None and resume.get("nothing_to_train"):
            return _untouched_summary(cfg, resume)
        prepare_output_dir(run, cfg.output_dir)
        model = build_classifier(bb, data.num_classes, img_size=img_size, global_pool=cfg.global_pool,
                                 drop_path_rate=cfg.drop_path, head_init_std=cfg.head_init_std, seed=cfg.seed).to(run.device)
        workers = num_workers(cfg, data.kind)
        train_ds = with_transform(data.train, make_transforms(cfg, img_size, bb.mean, bb.std, training=True), augment_seed=cfg.seed)
        val_ds = with_transform(data.val, make_transforms(cfg, img_size, bb.mean, bb.std, training=False))
        probe = _init_head(run, cfg, model, train_ds, val_ds, workers) if resume is None else None
        trainer = _Trainer(run, cfg, model, data.num_classes, steps_per_epoch)
        trainer.probe = probe
        trainer.identity = identity
        history: List[Dict] = []
        if resume is not None:
            trainer.load(resume)
            history = [r for r in resume["history"] if r["epoch"] <= resume["epoch"]]
            run.say(f"resumed from {resume['path']} after epoch {resume['epoch']}")
        start = resume["epoch"] if resume else 0
        run.say(f"fastebm-eval finetune: {bb.describe()}; {data.description} ({len(data.train)} train / {len(data.val)} val, "
                f"{data.num_classes} classes); recipe {cfg.recipe}, {img_size} px, {cfg.epochs} epochs x {steps_per_epoch} steps, lr {trainer.lr:.3g}, "
                f"layer decay {cfg.layer_decay}; output {cfg.output_dir}")
        status = _loop(run, cfg, trainer, sampler, train_ds, val_ds, workers, start, history, resume is not None)
        return _finish(run, cfg, bb, data, history, status, trainer)
    finally:
        run.close()


def _nothing_to_train(cfg, resume: Dict[str, Any]) -> bool:
    """Warns (one line, like fastebm-train) when the checkpoint is at or past where this run would stop."""
    stop_at = cfg.epochs if cfg.max_epochs is None else cfg.max_epochs
    epoch = int(resume["epoch"])
    if epoch < stop_at:
        return False
    head = f"nothing to train: {resume['path']} is at epoch {epoch}"
    if epoch < cfg.epochs:
        log.warning(f"{head} and --max_epochs is {cfg.max_epochs} (the run has --epochs {cfg.epochs}); the files are "
                    f"left as they are. To train further, resume with a larger --max_epochs (at most --epochs)")
    else:
        log.warning(f"{head}, the end of the run (--epochs {cfg.epochs}); the files are left as they are. To train "
                    f"longer, start a new run with a larger --epochs in another --output_dir")
    return True


def _untouched_summary(cfg, resume: Dict[str, Any]) -> Dict[str, Any]:
    """The run's summary.json as it is (nothing is written), or the checkpoint's record when there is none."""
    try:
        with open(os.path.join(cfg.output_dir, SUMMARY_FILE)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        history = resume.get("history") or []
        return {"status": "nothing_to_train", "epochs_done": int(resume["epoch"]), "history": history,
                "checkpoint": resume["path"], "config": resume["config"]}


def _init_head(run, cfg, model, train_ds, val_ds, workers) -> Optional[Dict[str, Any]]:
    """``--head_init``: random is build_classifier's (MAE); zero; probe fits LP-FT's head (returns its record)."""
    if cfg.head_init == "zero":
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
    if cfg.head_init != "probe":
        return None
    # the probe sees the labelled training images as the validation set is seen: no augmentation
    probe = fit_probe_head(run, cfg, model, with_transform(train_ds, val_ds.transform), val_ds, workers)
    run.say(f"--head_init probe (LP-FT): linear probe top-1 {100 * probe['top1']:.2f} % on the same labels, loaded as the head")
    return probe


def _loop(run, cfg, trainer, sampler, train_ds, val_ds, workers, start, history, resumed) -> str:
    from ..runlog import Console

    stop_at = cfg.epochs if cfg.max_epochs is None else cfg.max_epochs
    logger = MetricsLogger(cfg.output_dir, enabled=run.is_main, resume_step=start if resumed else None)
    console = Console(stop_at * (len(sampler) // cfg.batch_size // cfg.accum_iter), trainer.updates, enabled=run.is_main)
    stop = StopRequest().install()
    status = "completed" if stop_at == cfg.epochs else "stopped_at_max_epochs"
    try:
        for epoch in range(start, stop_at):
            seed_epoch(cfg.seed, epoch)
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            batches = loader(train_ds, cfg.batch_size, sampler, workers, run.device, cfg.seed, epoch, drop_last=True)
            stats = trainer.train_epoch(epoch, batches, stop, console)
            if stats.get("stopped"):
                status = f"interrupted_{stop.name or 'signal'}".lower()
                saved = max([r["epoch"] for r in history if "val_top1" in r] or [start])
                console.message(f"received {stop.name}: stopping; --resume auto continues after epoch {saved}")
                break
            rec = {"epoch": epoch + 1, "step": epoch + 1, **stats}
            boundary = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 in (stop_at, cfg.epochs)
            if boundary:
                rec.update({f"val_{k}": v for k, v in evaluate(run, trainer.model, val_ds, cfg.batch_size, workers).items()})
                if trainer.ema is not None:
                    rec.update({f"val_ema_{k}": v for k, v in evaluate(run, trainer.ema.module, val_ds, cfg.batch_size, workers).items()})
                console.message(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}, val top-1 "
                                f"{100 * rec['val_top1']:.2f} %, top-5 {100 * rec['val_top5']:.2f} %")
            history.append(rec)
            logger.log(rec)
            if cfg.save_ckpt and boundary and run.is_main:  # resume restarts after the last evaluated epoch
                atomic_torch_save(trainer.state(epoch + 1, history), os.path.join(cfg.output_dir, CKPT_FILE))
            distributed.barrier()
    finally:
        stop.uninstall()
        console.close()
        logger.close()
    return status


def _finish(run, cfg, bb, data, history, status, trainer) -> Dict[str, Any]:
    summary = base_summary(run, cfg, bb, data)
    summary.update({"status": status, "epochs_done": len(history) and history[-1]["epoch"], "lr": trainer.lr,
                    "updates": trainer.updates, "head_init": cfg.head_init, "history": history,
                    "backbone_sha256": trainer.identity.get("backbone_sha256"), "resumes": trainer.resumes})
    if trainer.probe is not None:
        summary["probe"] = trainer.probe
    trained = [r for r in history if "train_top1" in r]
    if trained:
        summary["train_top1"] = trained[-1]["train_top1"]
    evaluated = [r for r in history if "val_top1" in r]
    if evaluated:
        best = max(evaluated, key=lambda r: r["val_top1"])
        summary.update({"top1": evaluated[-1]["val_top1"], "top5": evaluated[-1]["val_top5"],
                        "eval_epoch": evaluated[-1]["epoch"], "best_top1": best["val_top1"], "best_epoch": best["epoch"]})
        if trainer.ema is not None:
            summary["top1_ema"] = evaluated[-1]["val_ema_top1"]
    if cfg.save_ckpt:
        summary["checkpoint"] = os.path.join(cfg.output_dir, CKPT_FILE)
    curves = {"val top-1": [r["val_top1"] for r in evaluated]}
    if trainer.ema is not None:
        curves["val top-1 (EMA)"] = [r["val_ema_top1"] for r in evaluated]
    plot = (PLOT_FILE, lambda fh: plot_curves(fh, [r["epoch"] for r in evaluated], curves, "epoch",
                                               f"fine-tuning {summary['model'] or 'ViT'} ({summary['init']})"))
    summary = finish(run, cfg, summary, _table(summary), plot if evaluated else None)
    if evaluated:
        run.say(f"finetune: {status}; top-1 {100 * summary['top1']:.2f} % (best {100 * summary['best_top1']:.2f} % at "
                f"epoch {summary['best_epoch']}); outputs in {os.path.abspath(cfg.output_dir)}")
    return summary


def _table(s: Dict[str, Any]) -> str:
    h = [r for r in s["history"] if "val_top1" in r]
    head = (f"# Fine-tuning ({what_line(s)})\n\nStatus {s['status']}, lr {s['lr']:.3g}, {s['updates']} optimiser steps, "
            f"head init {s['head_init']}.\n\n")
    if "probe" in s:
        head += f"LP-FT: the head started as the linear probe of the same labels (top-1 {100 * s['probe']['top1']:.2f} %).\n\n"
    if not h:
        return head + "No epoch was evaluated.\n"
    pick = sorted(set([r["epoch"] for r in h][:: max(1, len(h) // 10)] + [h[-1]["epoch"], s["best_epoch"]]))

    def train_acc(r):
        return f"{100 * r['train_top1']:.2f}" if "train_top1" in r else "-"

    rows = "\n".join(f"| {r['epoch']} | {r['train_loss']:.4f} | {train_acc(r)} | {100 * r['val_top1']:.2f} | "
                     f"{100 * r['val_top5']:.2f} |" for r in h if r["epoch"] in pick)
    return (head + f"**top-1 {100 * s['top1']:.2f} %** (epoch {s['eval_epoch']}), best {100 * s['best_top1']:.2f} % at epoch "
            f"{s['best_epoch']}.\n\n| epoch | train loss | train top-1 (%) | val top-1 (%) | val top-5 (%) |\n"
            f"|---|---|---|---|---|\n{rows}\n")
