"""The training loop of ``fastebm-train``: read top to bottom.

    set-up (device, seed, model + objective, data, optimiser, resume)
    -> [demo] evaluate the initial model
    -> for each optimiser step: accum_iter micro-batches (prepare_batch -> objective -> backward),
       skip non-finite steps, clip, AdamW step with the scheduled lr; log, pictures, checkpoint;
       on SIGTERM/SIGINT save and stop
    -> final checkpoint, pictures, [demo] evaluation, summary.json

Process-dependent decisions go through ``fastebm.distributed`` (rank-0 writes everything); the module that a
distributed wrapper would wrap is the ``RestorationObjective`` (all T steps and the loss in one
forward).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import create_model
from .. import distributed
from ..corrupt import prepare_batch
from ..data.builtin import BuiltinDemoData
from ..errors import CheckpointError, DataError, DistributedFailure, FastEBMError, TrainingDiverged
from ..data.folder import ImageFolderData
from ..data.loader import MicroBatchStream
from ..data.sampling import BatchPlan
from ..models import PRESETS
from ..restore import RestorationObjective
from ..checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, UsageError, save_yaml
from .faults import StopRequest, injected_nan_steps
from .metrics import Console, MetricsLogger, flatten_stats, read_metrics
from .optim import build_optimizer
from .rng import capture_rng_state, restore_rng_state, seed_everything, side_rng
from .schedule import lr_at, scaled_lr

# Config keys that may differ between a checkpoint and the run resuming it without changing the run.
_RESUME_FREE_KEYS = {"dist_backend", "dist_timeout", "fsdp", "max_steps", "resume", "output_dir", "log_every", "save_every", "grid_every", "num_workers",
                     "eval", "device", "strict_data", "max_bad_steps", "attn_backend", "data"}
GRID_FILE = "restoration_grid.png"
LOSS_FILE = "loss_curve.png"
PREVIEW_IMAGES = 8


def _say(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)


def _warn(text: str) -> None:
    if distributed.is_main():
        import sys

        print(f"fastebm-train: warning: {text}", file=sys.stderr, flush=True)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def build_objective(cfg: TrainConfig) -> RestorationObjective:
    # The func engine is correct only with math attention (DESIGN.md §4): under it, "auto" means math
    # rather than the fused kernel that auto picks on CUDA; an explicit "triton" is still refused below.
    attn_backend = "math" if cfg.engine == "func" and cfg.attn_backend == "auto" else cfg.attn_backend
    try:
        model = create_model(cfg.model, img_size=cfg.img_size, energy=cfg.energy, attn_backend=attn_backend)
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


def _check_corruption(cfg: TrainConfig, img_size: int, patch_size: int) -> None:
    """Task/geometry mismatches (e.g. --img_size not a multiple of the sr factor) fail now, not at step 0."""
    probe = torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)
    for task in cfg.tasks:
        try:
            prepare_batch(probe, [task], seed=0, patch_size=patch_size, params=cfg.task_params, backend="reference")
        except ValueError as exc:
            raise UsageError(f"--tasks {task} with --img_size {img_size}: {exc}") from None


def build_data(cfg: TrainConfig, img_size: int):
    if cfg.data is None:
        return BuiltinDemoData(img_size, cfg.seed)
    source = ImageFolderData(cfg.data, img_size, cfg.seed)
    source.check_readable()
    return source


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


@dataclass
class RunState:
    """Everything the loop carries between steps besides modules (saved in checkpoints)."""

    step: int = 0
    bad_files: List[str] = field(default_factory=list)
    skipped_steps: List[int] = field(default_factory=list)
    eval_init: Dict[str, Any] = field(default_factory=dict)


def demo_evaluation(objective, source: BuiltinDemoData, cfg: TrainConfig, device) -> Dict[str, Any]:
    """PSNR gain per task on held-out images and linear-probe accuracy on held-out digits."""
    from ..eval.linprobe import linear_probe_accuracy
    from ..eval.psnr import mean_gain, psnr_gain

    model = objective.model
    with side_rng(device):
        per_task = psnr_gain(objective, source.held_out.restoration_images(), cfg.tasks, patch_size=model.patch_size,
                             params=cfg.task_params, device=device)
        probe = linear_probe_accuracy(model, source.train_digits, source.train_digit_labels,
                                      source.held_out.digits, source.held_out.digit_labels, device=device, seed=cfg.seed)
    return {"psnr_gain_db": mean_gain(per_task), "psnr_per_task": per_task, "linprobe_acc": probe["accuracy"]}


def _checkpoint_state(cfg, model_sd, optim_sd, scaler, run: RunState, plan: BatchPlan, schedule: Dict,
                      rng_per_rank: List[Dict]) -> Dict:
    return {
        "model": model_sd,
        "optimizer": optim_sd,
        "scaler": scaler.state_dict(),
        "step": run.step,
        "epoch": run.step // plan.steps_per_epoch,
        "data_position": {"epoch": run.step // plan.steps_per_epoch,
                          "micro_batch": (run.step % plan.steps_per_epoch) * plan.accum_iter,
                          "num_samples": plan.num_samples},
        "schedule": dict(schedule),
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,  # every process's streams, restored per rank on resume
        "config": cfg.to_dict(),
        "bad_files": list(run.bad_files),
        "skipped_steps": list(run.skipped_steps),
        "eval_init": run.eval_init,
        "world_size": plan.world_size,
    }


def _save(cfg, objective, optimizer, scaler, run, plan, schedule) -> Optional[str]:
    """Rank 0 writes last.pt, once; never a checkpoint of non-finite weights.

    Collective: every rank calls it at the same step (FSDP2 gathers the sharded state, every rank's
    RNG state and unreadable-file list are collected), and all pass a barrier after the write.
    """
    rng_per_rank = distributed.all_gather_object(capture_rng_state())
    if distributed.world_size() > 1:
        merged = [f for files in distributed.all_gather_object(run.bad_files) for f in files]
        run.bad_files = list(dict.fromkeys(merged))
    model_sd, optim_sd = distributed.gather_for_checkpoint(objective, optimizer)
    bad = [n for n, v in model_sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if distributed.any_rank(bool(bad)):
        raise TrainingDiverged(f"refusing to checkpoint non-finite parameters ({bad[:3]}...) at step {run.step}")
    path = None
    if distributed.is_main():
        path = save_checkpoint(_checkpoint_state(cfg, model_sd, optim_sd, scaler, run, plan, schedule, rng_per_rank),
                               cfg.output_dir)
    distributed.barrier()
    return path


def _check_resume_config(saved: Dict[str, Any], cfg: TrainConfig, path: str) -> None:
    changed = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in _RESUME_FREE_KEYS and saved.get(k) != v}
    if changed:
        pretty = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        _warn(f"resuming {path} with changed settings ({pretty}); the run is no longer the same run")


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Runs one training job as configured; returns the summary (also written to summary.json).

    Under torchrun every process calls this: it joins the process group (NCCL on CUDA, gloo on
    CPU), trains its slice of every global batch under DDP (or FSDP2 with ``--fsdp``) and leaves
    the group at the end. A dead or hung peer raises :class:`fastebm.distributed.DistributedFailure`
    naming it.
    """
    owns_group = not distributed.is_initialized()
    info = distributed.init_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout)
    try:
        return _train(cfg, info)
    except (FastEBMError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if info.distributed and distributed.is_collective_failure(exc):
            raise DistributedFailure(distributed.explain_failure(exc)) from exc
        raise
    finally:
        if owns_group:
            distributed.destroy_distributed()


def _train(cfg: TrainConfig, info: "distributed.DistInfo") -> Dict[str, Any]:
    t_start = time.time()
    device = info.device
    autocast_dtype = _autocast_dtype(cfg, device)
    if distributed.is_main():
        os.makedirs(cfg.output_dir, exist_ok=True)
    rank, world = distributed.rank(), distributed.world_size()

    # ---------------------------------------------------------------- model, data, optimiser
    # data first: a bad folder fails before any model is built
    source = build_data(cfg, cfg.img_size or PRESETS[cfg.model]["img_size"])
    seed_everything(cfg.seed)
    objective = build_objective(cfg).to(device)
    model = objective.model
    img_size = model.img_size[0]
    _check_corruption(cfg, img_size, model.patch_size)
    plan = BatchPlan(len(source), cfg.batch_size, cfg.accum_iter, world, rank, cfg.seed)
    if plan.steps_per_epoch < 1:
        raise UsageError(f"the data has {len(source)} images, fewer than one optimiser step needs "
                         f"(batch_size {cfg.batch_size} x accum_iter {cfg.accum_iter} x {world} process(es)); "
                         f"lower --batch_size or --accum_iter")
    total_steps = cfg.epochs * plan.steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * plan.steps_per_epoch))
    base_lr = scaled_lr(cfg.blr, cfg.batch_size, cfg.accum_iter, world)
    schedule = {"base_lr": base_lr, "min_lr": cfg.min_lr, "warmup_steps": warmup_steps, "total_steps": total_steps,
                "steps_per_epoch": plan.steps_per_epoch}
    if cfg.fsdp and world > 1:
        _say("fastebm-train: --fsdp: " + distributed.FSDP_SUMMARY)
        distributed.shard_fsdp(objective, device)
    elif cfg.fsdp:
        _warn("--fsdp with a single process: nothing to shard, training unsharded")
    optimizer = build_optimizer(objective, lr=base_lr, weight_decay=cfg.weight_decay, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    run = RunState()

    # ---------------------------------------------------------------- resume
    resumed_from = None
    if cfg.resume is not None:
        if cfg.resume == "auto":
            state, resumed_from = find_resume_checkpoint(cfg.output_dir)
            if state is None:
                _say(f"--resume auto: no checkpoint in {cfg.output_dir}; starting from scratch")
        else:
            state, resumed_from = load_checkpoint(cfg.resume), cfg.resume
        if state is not None:
            _check_resume_config(state["config"], cfg, resumed_from)
            if state.get("world_size", world) != world:
                _warn(f"{resumed_from} was written by {state.get('world_size')} process(es), this job has {world}: "
                      f"the global batch and learning rate change, and each rank's RNG streams restart from rank 0's")
            try:
                distributed.load_from_checkpoint(objective, optimizer, state["model"], state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint {resumed_from} does not fit this model/optimiser: "
                                      f"{str(exc).splitlines()[0][:200]}") from None
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            run = RunState(step=int(state["step"]), bad_files=list(state.get("bad_files", [])),
                           skipped_steps=list(state.get("skipped_steps", [])), eval_init=dict(state.get("eval_init", {})))
            per_rank = state.get("rng_per_rank") or []
            restore_rng_state(per_rank[rank] if len(per_rank) == world else state["rng"])
            _say(f"resumed from {resumed_from} at step {run.step}")
            del state

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart > 0 and cfg.resume is None:
        _warn(f"torchrun restarted this job (attempt {restart + 1}) but --resume is not set: training starts from "
              f"scratch; add --resume auto to continue from {os.path.join(cfg.output_dir, 'last.pt')}")
    # One forward per backward over the whole objective (all T steps and the loss): DDP wraps it.
    wrapped = objective
    if world > 1 and not distributed.is_sharded(objective):
        wrapped = distributed.wrap_ddp(objective, device)
    end_step = total_steps if cfg.max_steps is None else min(cfg.max_steps, total_steps)
    if distributed.is_main():
        save_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    logger = MetricsLogger(cfg.output_dir, enabled=distributed.is_main(), resume_step=run.step if resumed_from else None)
    preview = preview_images(source)
    is_demo = isinstance(source, BuiltinDemoData)
    _say(f"fastebm-train: {cfg.model} ({img_size} px, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params) "
         f"on {device}, {'built-in demo data' if is_demo else cfg.data} ({len(source)} samples), "
         f"{plan.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, lr {base_lr:.3g}, tasks {','.join(cfg.tasks)}, "
         f"T={cfg.steps}; output {cfg.output_dir}")

    if is_demo and cfg.eval and not run.eval_init and run.step == 0 and distributed.is_main():
        run.eval_init = demo_evaluation(objective, source, cfg, device)
        _say(f"initial model: psnr gain {run.eval_init['psnr_gain_db']:+.2f} dB, linear probe {run.eval_init['linprobe_acc']:.3f}")

    # ---------------------------------------------------------------- the loop
    stream = MicroBatchStream(source, plan, num_workers=_num_workers(cfg, source), pin_memory=device.type == "cuda")
    stop = StopRequest().install()
    console = Console(end_step, run.step, enabled=distributed.is_main())
    inject = injected_nan_steps()
    params = [p for p in objective.parameters() if p.requires_grad]
    bad_streak, status = 0, "completed" if end_step == total_steps else "stopped_at_max_steps"
    window: Dict[str, List[float]] = {}
    window_images, window_start = 0, time.time()
    step_loss, step_ok = 0.0, True
    last_saved_step = run.step if resumed_from else None
    interrupted = False
    try:
        for batch in stream.iterate(run.step, end_step):
            s, micro = batch["step"], batch["micro"]
            if batch["bad"]:
                known = set(run.bad_files)
                run.bad_files.extend(b for b in dict.fromkeys(batch["bad"]) if b not in known)
                if cfg.strict_data:
                    raise DataError(f"--strict_data: unreadable image {batch['bad'][0]}")
            if micro == 0:
                step_loss, step_ok, step_stats = 0.0, True, {}
            if step_ok:
                images = batch["images"].to(device, non_blocking=True)
                clean, corrupted, weight, _ = prepare_batch(images, cfg.tasks, seed=cfg.seed, offset=s,
                                                            sample_ids=batch["positions"], patch_size=model.patch_size,
                                                            params=cfg.task_params)
                # Gradients are all-reduced on the last micro-step only (DDP no_sync before it).
                with distributed.gradient_sync(wrapped, sync=micro == cfg.accum_iter - 1):
                    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                        loss, stats = wrapped(clean, corrupted, weight)
                    if s in inject:
                        loss = loss * float("nan")
                    finite = not distributed.any_rank(not bool(torch.isfinite(loss).item()))
                    if finite:
                        scaler.scale(loss / cfg.accum_iter).backward()
                        step_loss += loss.item() / cfg.accum_iter
                        for k, v in flatten_stats(stats).items():
                            step_stats[k] = step_stats.get(k, 0.0) + v / cfg.accum_iter
                    else:
                        step_ok = False
                        if wrapped is not objective:
                            # DDP/FSDP expect the backward of every forward; its gradients are dropped below.
                            loss.backward()
            if micro < cfg.accum_iter - 1:
                continue

            # -------- optimiser step s (all micro-batches seen)
            lr = lr_at(s, base_lr=base_lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
            grad_norm = float("nan")
            if step_ok:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                step_ok = not distributed.any_rank(not math.isfinite(grad_norm)) or scaler.is_enabled()
                if step_ok:
                    scaler.step(optimizer)  # with fp16 the scaler itself skips inf/NaN gradients
                    scaler.update()
            optimizer.zero_grad(set_to_none=True)
            run.step = s + 1
            distributed.heartbeat(run.step)
            console.step()
            if not step_ok:
                bad_streak += 1
                run.skipped_steps.append(s)
                _warn(f"non-finite loss or gradient at step {s}: step skipped ({bad_streak} in a row, "
                      f"limit --max_bad_steps {cfg.max_bad_steps})")
                if bad_streak >= cfg.max_bad_steps:
                    kept = os.path.join(cfg.output_dir, "last.pt")
                    where = f"last good checkpoint kept: {kept} (step {last_saved_step})" if last_saved_step is not None \
                        else "no checkpoint had been written yet"
                    _write_summary(cfg, {"status": "diverged", "step": run.step, "skipped_steps": run.skipped_steps,
                                         "last_good_checkpoint_step": last_saved_step, "config": cfg.to_dict()})
                    raise TrainingDiverged(f"{bad_streak} non-finite losses in a row (steps {s - bad_streak + 1}..{s}); "
                                           f"stopped; {where}. Lower --blr or --clip_grad, or check the data")
            else:
                bad_streak = 0
                for k, v in step_stats.items():
                    window.setdefault(k, []).append(v)
                window.setdefault("loss", []).append(step_loss)
                window.setdefault("grad_norm", []).append(grad_norm)
            window_images += cfg.batch_size * cfg.accum_iter * world

            # -------- logging, pictures, checkpoints at step boundaries
            if run.step % cfg.log_every == 0 or run.step == end_step:
                elapsed = max(time.time() - window_start, 1e-9)
                record = {"step": run.step, "epoch": s // plan.steps_per_epoch, "lr": lr,
                          "img_per_s": window_images / elapsed, "time": time.time() - t_start}
                means = {k: float(np.mean(v)) for k, v in window.items()}
                if world > 1:  # every rank logs the same steps, so the windows have the same keys
                    keys = sorted(means)
                    reduced = distributed.all_reduce_mean(torch.tensor([means[k] for k in keys], dtype=torch.float64))
                    means = dict(zip(keys, reduced.tolist()))
                record.update(means)
                logger.log(record)
                console.report(run.step, record["epoch"], record.get("loss", float("nan")), record["img_per_s"], lr)
                window, window_images, window_start = {}, 0, time.time()
            if cfg.grid_every and run.step % cfg.grid_every == 0 and run.step != end_step:
                plain = _plain_objective(cfg, objective, device)  # collective under FSDP2
                if distributed.is_main():
                    _pictures(cfg, plain, preview, device, run.step)
            if distributed.any_rank(stop.requested):  # every rank joins the vote, so all stop together
                _save(cfg, objective, optimizer, scaler, run, plan, schedule)
                console.message(f"received {stop.name or 'stop request'}: checkpoint saved at step {run.step} "
                                f"({os.path.join(cfg.output_dir, 'last.pt')}); resume with --resume auto")
                status, interrupted = f"interrupted_{stop.name or 'signal'}".lower(), True
                break
            # No periodic checkpoint during a run of non-finite steps: the last one before it stays the fallback.
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step != end_step and bad_streak == 0:
                _save(cfg, objective, optimizer, scaler, run, plan, schedule)
                last_saved_step = run.step
    finally:
        console.close()
        stop.uninstall()
        logger.close()

    # ---------------------------------------------------------------- the end
    if not interrupted:
        _save(cfg, objective, optimizer, scaler, run, plan, schedule)
    summary: Dict[str, Any] = {"status": status, "step": run.step, "total_steps": total_steps,
                               "epoch": run.step / plan.steps_per_epoch, "device": str(device),
                               "skipped_files": {"count": len(run.bad_files), "files": run.bad_files[:100]},
                               "skipped_steps": run.skipped_steps, "checkpoint": os.path.join(cfg.output_dir, "last.pt")}
    records = read_metrics(cfg.output_dir) if distributed.is_main() else []
    if records:
        summary["final_loss"] = records[-1].get("loss")
        rates = [r["img_per_s"] for r in records if "img_per_s" in r]
        summary["img_per_s"] = float(np.median(rates)) if rates else None
    if not interrupted:
        objective = _plain_objective(cfg, objective, device)  # collective under FSDP2
    if not interrupted and distributed.is_main():
        model = objective.model
        _pictures(cfg, objective, preview, device, run.step)
        from ..eval.export import export_backbone

        summary["backbone"] = export_backbone(model, os.path.join(cfg.output_dir, "backbone.pth"))
        if is_demo and cfg.eval:
            final = demo_evaluation(objective, source, cfg, device)
            init = run.eval_init or {}
            summary["psnr_gain_db"] = {"init": init.get("psnr_gain_db"), "pretrained": final["psnr_gain_db"]}
            summary["psnr_gain_db_per_task"] = {
                task: {"init": init.get("psnr_per_task", {}).get(task, {}).get("gain"), "pretrained": v["gain"]}
                for task, v in final["psnr_per_task"].items()}
            summary["linprobe_acc"] = {"init": init.get("linprobe_acc"), "pretrained": final["linprobe_acc"]}
    if run.bad_files:
        _warn(f"skipped {len(run.bad_files)} unreadable image(s), e.g. {run.bad_files[0]} (listed in summary.json)")
    summary["wall_time_s"] = time.time() - t_start
    summary["config"] = cfg.to_dict()
    _write_summary(cfg, summary)
    if distributed.is_main():
        if "psnr_gain_db" in summary:
            p, l = summary["psnr_gain_db"], summary["linprobe_acc"]
            _say(f"psnr_gain_db: init {_fmt(p['init'])} -> pretrained {_fmt(p['pretrained'])} (held-out images, mean over tasks)")
            _say(f"linprobe_acc: init {_fmt(l['init'])} -> pretrained {_fmt(l['pretrained'])} (held-out digits)")
        _say(f"done: {status} at step {run.step} in {summary['wall_time_s']:.0f} s; outputs in {cfg.output_dir}")
    return summary


def _write_summary(cfg: TrainConfig, summary: Dict[str, Any]) -> None:
    if distributed.is_main():
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)


def _plain_objective(cfg: TrainConfig, objective, device):
    """An unsharded objective for rank-0-only work (pictures, export, evaluation).

    Without FSDP2 that is the objective itself. FSDP2 parameters are DTensors whose every use is a
    collective, so every rank gathers the full weights and rank 0 loads them into a plain copy.
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


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _num_workers(cfg: TrainConfig, source) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    if isinstance(source, BuiltinDemoData):
        return 0  # in memory already; worker start-up would cost more than it saves
    return min(8, os.cpu_count() or 1)


def _pictures(cfg, objective, preview, device, step: int) -> None:
    from .pictures import loss_curve, restoration_grid

    with side_rng(device):
        restoration_grid(objective, preview, cfg.tasks, os.path.join(cfg.output_dir, GRID_FILE),
                         patch_size=objective.model.patch_size, params=cfg.task_params,
                         title=f"{cfg.model}, step {step}: rows clean / corrupted / after each restoration step")
    loss_curve(read_metrics(cfg.output_dir), os.path.join(cfg.output_dir, LOSS_FILE), title=f"{cfg.model} training loss")
