"""The Trainer's phases before the first step: set-up, ``--resume``, start.

:class:`TrainerStartup` is the first half of :class:`~fastebm.train.trainer.Trainer` (which adds
the loop and the end). Set-up only reads: the output folder's check, data, loader, model +
objective, batch plan, lr schedule, optimiser; a bad folder or flag fails before anything is
written. ``resume`` loads a checkpoint into that; ``start`` is the first phase that writes (the
output folder, config.yaml, the metrics log). A SIGTERM/SIGINT during these phases ends the run at
once (:class:`~fastebm.train.faults.StartupInterrupted`); under torchrun the ranks vote on it at
fixed points, so that all leave together.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

from .. import distributed
from ..checkpoint import (LAST, PREVIOUS, TRAIN_CONFIG, damaged_last, find_resume_checkpoint, load_checkpoint,
                          set_aside_damaged)
from ..data.builtin import BuiltinDemoData
from ..data.streams import resolve_loader
from ..errors import CheckpointError
from ..models import pretrain_img_size
from .build import autocast_dtype, batch_plan, build_data, build_objective, check_corruption, preview_images
from .checkpoint import check_resume_config, saved_config
from .config import TrainConfig, save_yaml
from .evaluation import demo_evaluation
from ..runlog import MetricsLogger
from ..signals import StartupInterrupted, StopRequest
from .faults import RestorationWatch
from .optim import build_optimizer
from .rng import restore_rng_state, seed_everything
from .run_dir import check_output_dir, prepare_output_dir
from .schedule import scaled_lr
from .state import LoopState
from .window import MetricsWindow

log = logging.getLogger(__name__)


class TrainerStartup:
    """One training job as configured, up to its first step (every process of a torchrun job builds one)."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, stop: Optional[StopRequest] = None):
        """Set-up, reading only: the output folder's check, data (a bad folder fails before any model is
        built), loader, model, plan, optimiser. ``stop``: the signal handling :func:`~fastebm.train.job.train`
        installed (None: the loop installs its own for its duration)."""
        self.cfg, self.t_start = cfg, time.time()
        self.device = info.device
        self.stop, self._owns_stop = (stop, False) if stop is not None else (StopRequest(), True)
        self.autocast_dtype = autocast_dtype(cfg, self.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        check_output_dir(cfg)  # collective: rank 0 checks, every rank raises its verdict
        self.source = build_data(cfg, cfg.img_size or pretrain_img_size(cfg.model))
        self.is_demo = isinstance(self.source, BuiltinDemoData)
        self.loader = resolve_loader(cfg.loader, self.device, self.source)
        self._startup_vote()  # scanning a large folder takes a while: a stop request during it ends here
        seed_everything(cfg.seed)
        self.objective = build_objective(cfg).to(self.device)
        self.model = self.objective.model
        check_corruption(cfg, self.model.img_size[0], self.model.patch_size)
        self.plan = batch_plan(cfg, len(self.source), self.world, self.rank)
        steps_per_epoch = self.plan.steps_per_epoch
        base_lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, cfg.batch_size, cfg.accum_iter, self.world)
        self.schedule = {"base_lr": base_lr,
                         "min_lr": cfg.min_lr, "warmup_steps": int(round(cfg.warmup_epochs * steps_per_epoch)),
                         "total_steps": cfg.epochs * steps_per_epoch, "steps_per_epoch": steps_per_epoch}
        self.total_steps = self.schedule["total_steps"]
        self.end_step = self.total_steps if cfg.max_steps is None else min(cfg.max_steps, self.total_steps)
        if cfg.fsdp and self.world > 1:
            log.info("fastebm-train: --fsdp: " + distributed.FSDP_SUMMARY)
            distributed.shard_fsdp(self.objective, self.device)
        elif cfg.fsdp:
            log.warning("--fsdp with a single process: nothing to shard, training unsharded")
        self.optimizer = build_optimizer(self.objective, lr=self.schedule["base_lr"], weight_decay=cfg.weight_decay,
                                         device=self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.wrapped = self.objective  # what the loop calls; DDP around the objective under torchrun (start)
        self.state = LoopState()
        self.window = MetricsWindow(self.device, cfg.accum_iter)
        self.resumed_from: Optional[str] = None
        self.damaged_last: Optional[str] = None  # a damaged last.pt that start() moves aside (fallback resume)
        self.last_path = os.path.join(cfg.output_dir, LAST)
        self.watch = RestorationWatch(self.schedule["warmup_steps"])

    def _startup_vote(self) -> None:
        """Before the first step: ends the run on every rank together if any rank got SIGTERM/SIGINT
        (one process has already raised from the signal handler)."""
        if distributed.any_rank(self.stop.requested):
            raise StartupInterrupted(self.stop.name)

    def resume(self) -> None:
        """Loads ``--resume`` (a path, or ``auto``: OUTPUT_DIR's newest loadable checkpoint) into this run.

        Reads only. When it resumes from OUTPUT_DIR/last.prev.pt because last.pt is damaged, it notes
        last.pt in ``damaged_last`` for :meth:`start` to move aside. Raises CheckpointError when the
        checkpoint is unusable or does not fit this model/optimiser (a different --model, --img_size,
        --steps, or an --energy with other parameters)."""
        cfg = self.cfg
        if cfg.resume is None:
            return
        if cfg.resume == "auto":
            ckpt, path = find_resume_checkpoint(cfg.output_dir)
            if ckpt is None:
                log.info(f"--resume auto: no checkpoint in {cfg.output_dir}; starting from scratch")
                return
            if os.path.basename(path) == PREVIOUS and os.path.lexists(self.last_path):  # fell back: last.pt is damaged
                self.damaged_last = self.last_path
        else:
            ckpt, path = load_checkpoint(cfg.resume), cfg.resume
            self.damaged_last = damaged_last(cfg.output_dir, path) if distributed.is_main() else None
        try:
            distributed.load_from_checkpoint(self.objective, self.optimizer, ckpt["model"], ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            saved = saved_config(ckpt)
            differs = [f"--{k} {saved.get(k)} (this run: {getattr(cfg, k, None)})" for k in ("model", "img_size", "energy", "steps")
                       if k in saved and saved.get(k) != getattr(cfg, k, None)]
            detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
            hint = ("it was trained with " + ", ".join(differs) + "; give the same flags or a new --output_dir"
                    if differs else detail)
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimiser: {hint}") from None
        check_resume_config(ckpt, cfg, path, self.world)  # after the load: a checkpoint that does not fit is an error only
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = LoopState.from_checkpoint(ckpt)
        per_rank = ckpt.get("rng_per_rank") or []
        restore_rng_state(per_rank[self.rank] if len(per_rank) == self.world else ckpt["rng"])
        self.resumed_from = path
        log.info(f"resumed from {path} at step {self.state.step}")

    def nothing_to_train(self) -> Optional[str]:
        """After :meth:`resume`: the one line saying why nothing is left to train (the checkpoint is at or past
        the last step this run would train to), or None."""
        st, cfg = self.state, self.cfg
        if self.resumed_from is None or st.step < self.end_step:
            return None
        head = f"nothing to train: {self.resumed_from} is at step {st.step}"
        if self.end_step < self.total_steps:
            return (f"{head} and --max_steps is {cfg.max_steps}; the checkpoints are left as they are. To train further, "
                    f"resume with a --max_steps above {st.step} (the schedule ends at step {self.total_steps})")
        return (f"{head}, the end of its schedule (--epochs {cfg.epochs} x {self.plan.steps_per_epoch} steps = "
                f"{self.total_steps} steps); the checkpoints are left as they are. To train further, resume with a "
                f"larger --epochs (a longer learning-rate schedule: the resume warns that the run changes), "
                f"or start a new run")

    def start(self) -> None:
        """DDP wrapping, config.yaml, the metrics log, the banner and the demo's initial evaluation."""
        cfg, st = self.cfg, self.state
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart > 0 and cfg.resume is None:
            log.warning(f"torchrun restarted this job (attempt {restart + 1}) but --resume is not set: training starts "
                        f"from scratch; add --resume auto to continue from {self.last_path}")
        # One forward per backward over the whole objective (all T steps and the loss): DDP wraps it.
        if self.world > 1 and not distributed.is_sharded(self.objective):
            self.wrapped = distributed.wrap_ddp(self.objective, self.device)
        st.status = "completed" if self.end_step == self.total_steps else "stopped_at_max_steps"
        if distributed.is_main():  # every check has passed: only now is the output folder touched
            prepare_output_dir(cfg)
            if self.damaged_last is not None:
                # else the next save's rotation would move the damaged last.pt over the good last.prev.pt
                moved = set_aside_damaged(self.damaged_last)
                log.warning(f"moved the damaged checkpoint {self.damaged_last} aside to {moved}, so that saving does "
                            f"not rotate it over {os.path.join(cfg.output_dir, PREVIOUS)} (step {st.step}, the good "
                            f"one); delete {moved} when you no longer need it")
            save_yaml(cfg, os.path.join(cfg.output_dir, TRAIN_CONFIG))
        self.metrics = MetricsLogger(cfg.output_dir, enabled=distributed.is_main(),
                                     resume_step=st.step if self.resumed_from else None)
        self.preview = preview_images(self.source)
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        log.info(f"fastebm-train: {cfg.model} ({self.model.img_size[0]} px, {n_params:.2f} M params) on {self.device}, "
                 f"{'built-in demo data' if self.is_demo else cfg.data} ({len(self.source)} samples, "
                 f"{self.loader} loader), {self.plan.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
                 f"lr {self.schedule['base_lr']:.3g}{' (--lr)' if cfg.lr is not None else ''}, "
                 f"tasks {','.join(cfg.tasks)}, T={cfg.steps}; output {cfg.output_dir}")
        if self.is_demo and cfg.demo_eval and not st.eval_init and st.step == 0 and distributed.is_main():
            st.eval_init = demo_evaluation(self.objective, self.source, cfg, self.device)
            log.info(f"initial model: psnr gain {st.eval_init['psnr_gain_db']:+.2f} dB, "
                     f"linear probe {st.eval_init['linprobe_acc']:.3f}")
