"""The training loop of ``fastebm-train``: a :class:`Trainer` whose phases read top to bottom.

    Trainer(cfg, info)     set-up: output-folder check, data, loader, model + objective, batch plan,
                           lr schedule, optimiser (nothing is written yet)          } startup.py
    .run()
        .resume()          --resume: weights, optimiser, RNG streams, loop state    } startup.py
        .start()           output folder, DDP wrapping, config.yaml, metrics, banner, [demo] initial evaluation
        .loop()            the micro-batch stream (torch DataLoader or DALI), then
        for each optimiser step:
            .micro_step()      accum_iter x (prepare_batch -> objective -> backward), sums on the device
            .optimizer_step()  scheduled lr, clip, skip verdict + stop vote (one all-reduce), AdamW step unless vetoed
            .after_step()      metrics line, pictures, agreed stop request (SIGTERM/SIGINT), checkpoint
        .finish()          final checkpoint, pictures, backbone, [demo] evaluation, summary.json

The process around it (signals, process group, threads) is :func:`fastebm.train.job.train`. A
SIGTERM/SIGINT before the first step ends the run at once (:class:`~fastebm.train.faults.StartupInterrupted`);
after it, at a step boundary with a checkpoint: the next one in a single process, one or two later
with a process group (the vote rides in the step's all-reduce, :class:`~fastebm.train.faults.StopVote`).
Loop-carried values live in one :class:`~fastebm.train.state.LoopState`; the numbers of the logging
interval stay on the device (:class:`~fastebm.train.window.MetricsWindow`) and are read to the host
at log steps and checkpoints only. Per optimiser step, fp16 reads its skip flag, and a process
group's stop vote reads one flag a step late (no wait for the step since). Every decision that
depends on the process goes through :mod:`fastebm.distributed` (rank 0 writes files; verdicts are
agreed across ranks); the module a distributed wrapper wraps is the ``RestorationObjective`` (all
T steps and the loss in one forward; docs/design.md §8).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Optional

import torch

from .. import distributed
from ..corrupt import prepare_batch
from ..errors import DataError, TrainingDiverged
from ..log import one_line
from ..runlog import Console
from .build import micro_batch_stream, plain_objective
from .checkpoint import keep_epoch_checkpoint, save_collective
from .evaluation import compare_evaluations, demo_evaluation
from .faults import StopVote, injected_nan_steps
from .optim import step_unless
from .schedule import lr_at
from .startup import TrainerStartup
from .summary import log_results, run_summary, write_summary

log = logging.getLogger(__name__)


class Trainer(TrainerStartup):
    """One training job as configured: set-up, resume and start (:class:`~fastebm.train.startup.TrainerStartup`),
    then the loop and the end (here). Every process of a torchrun job builds one."""

    def run(self) -> Dict[str, Any]:
        """Trains from the current state to ``end_step`` (or a stop request); returns the summary.

        A resumed checkpoint already at or past ``end_step`` (``--max_steps`` or the schedule's end) trains
        nothing and writes nothing: one warning line says so and how to train further, and the summary
        returned (not written) has status ``nothing_to_train``."""
        self.resume()
        self._startup_vote()  # not inside resume(): whether a checkpoint is found may differ between nodes
        idle = self.nothing_to_train()
        if idle is not None:
            if distributed.is_main():
                log.warning(idle)
            return {"status": "nothing_to_train", "step": self.state.step, "trained_steps": 0,
                    "total_steps": self.total_steps, "checkpoint": self.resumed_from, "config": self.cfg.to_dict()}
        self.start()
        self.loop()
        return self.finish()

    def loop(self) -> None:
        """Every micro-batch from the current step to ``end_step``; stops early on a stop request."""
        cfg, st = self.cfg, self.state
        if self._owns_stop:
            self.stop.install()
        try:
            stream = self._stream()
            self.inject = injected_nan_steps()
            self.params = [p for p in self.objective.parameters() if p.requires_grad]
            self._startup_vote()
            self.stop.immediate = False  # from now on a stop request waits for the step boundary and saves
            self.vote = StopVote(self.stop)
            self.console = Console(self.end_step, st.step, enabled=distributed.is_main())
            self.window.reset()
            try:
                for batch in stream.iterate(st.step, self.end_step):
                    self.micro_step(batch)
                    if batch["micro"] < cfg.accum_iter - 1:
                        continue
                    lr = self.optimizer_step(batch["step"])
                    if self.after_step(batch["step"], lr):
                        break
            except RuntimeError as exc:
                if not self._loader_died_on_stop(exc):
                    raise
                log.warning(f"a data-loader worker died of the {self.stop.name} meant for this run "
                            f"({one_line(exc)[:200]}); stopping as asked")
                self._stop_at_boundary()
            finally:
                self.console.close()
        finally:
            if self._owns_stop:
                self.stop.uninstall()
            self.metrics.close()

    def _stream(self):
        return micro_batch_stream(self.cfg, self.loader, self.source, self.plan, self.device)

    def _loader_died_on_stop(self, exc: RuntimeError) -> bool:
        """A loader worker killed by the signal that asked this run to stop (it reached the worker before
        the worker ignored it): the stop, not a crash. One process only: under torchrun the other
        ranks would be in a different collective."""
        return self.stop.requested and self.world == 1 and "DataLoader worker" in str(exc)

    def micro_step(self, batch: Dict[str, Any]) -> None:
        """One micro-batch of optimiser step ``batch["step"]``: corrupt, restore, backward; no host read.

        Every forward gets its backward, finite or not (DDP/FSDP expect it, and knowing would need a
        host read): a non-finite loss is recorded on the device and vetoes the whole optimiser step.
        """
        cfg, st = self.cfg, self.state
        s, micro = batch["step"], batch["micro"]
        if batch["bad"]:
            st.add_bad_files(batch["bad"])
            if cfg.strict_data:
                raise DataError(f"--strict_data: unreadable image {batch['bad'][0]}")
        if micro == 0:
            self.window.start_step()
        images = batch["images"].to(self.device, non_blocking=True)
        clean, corrupted, weight, _ = prepare_batch(images, cfg.tasks, seed=cfg.seed, offset=s,
                                                    sample_ids=batch["positions"], patch_size=self.model.patch_size,
                                                    params=cfg.task_params)
        # Gradients are all-reduced on the last micro-step only (DDP no_sync before it).
        with distributed.gradient_sync(self.wrapped, sync=micro == cfg.accum_iter - 1):
            dtype = self.autocast_dtype
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, stats = self.wrapped(clean, corrupted, weight)
            if s in self.inject:
                loss = loss * float("nan")
            self.scaler.scale(loss / cfg.accum_iter).backward()
        self.window.add_micro_step(loss, stats)

    def optimizer_step(self, s: int) -> float:
        """Optimiser step ``s`` once all its micro-batches are in; returns its learning rate.

        Skipped (weights and AdamW state unchanged) when a loss or the gradient norm is non-finite on
        any rank: one all-reduce (none without a process group) of that flag and the stop request
        (:class:`~fastebm.train.faults.StopVote`), applied on the device by
        :func:`~fastebm.train.optim.step_unless`, read at the next log step or checkpoint. fp16 reads
        it here: GradScaler has no way to leave its scale alone for a step vetoed on the device.
        """
        cfg, sch, window = self.cfg, self.schedule, self.window
        lr = lr_at(s, base_lr=sch["base_lr"], min_lr=sch["min_lr"], warmup_steps=sch["warmup_steps"],
                   total_steps=sch["total_steps"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler.is_enabled():
            bad = self._agree(window.step_bad)
            norm = torch.full((), float("nan"), device=self.device)
            if not bool(bad):  # the one device read per optimiser step, fp16 only (see above)
                self.scaler.unscale_(self.optimizer)
                norm = self._clip_gradients()
                self.scaler.step(self.optimizer)  # the scaler itself skips inf/NaN gradients (not counted as skipped)
                self.scaler.update()
        else:
            norm = self._clip_gradients()
            bad = self._agree(window.step_bad | ~torch.isfinite(norm))
            step_unless(self.optimizer, bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = s + 1
        distributed.heartbeat(self.state.step)
        self.console.step()
        window.end_step(s, bad, norm, cfg.batch_size * cfg.accum_iter * self.world)
        return lr

    def _agree(self, bad: torch.Tensor) -> torch.Tensor:
        """This rank's skip flag -> the verdict of every rank, shape (1,), on the device and not read. The
        same all-reduce carries the stop vote (:class:`~fastebm.train.faults.StopVote`)."""
        agreed = distributed.any_rank_flags(self.vote.flags(bad))
        self.vote.post(agreed)
        return agreed[:1]

    def _clip_gradients(self) -> torch.Tensor:
        """Clips to --clip_grad (if set); the total gradient norm as a plain tensor on the device (not read)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _settle_steps(self) -> int:
        """Reads the skip verdicts of the steps since the last read (one host read); returns ``bad_streak``.

        Each skipped step is logged and listed in ``skipped_steps``; a run of --max_bad_steps of them
        ends the run (TrainingDiverged) with the same outputs as when it was detected at once.
        """
        st = self.state
        for s, skipped in self.window.take_verdicts():
            if skipped:
                self._skip_step(s)
            else:
                st.bad_streak = 0
        return st.bad_streak

    def _skip_step(self, s: int) -> None:
        """Non-finite step ``s`` left the weights alone; too many in a row end the run (TrainingDiverged)."""
        cfg, st = self.cfg, self.state
        st.bad_streak += 1
        st.skipped_steps.append(s)
        log.warning(f"non-finite loss or gradient at step {s}: step skipped ({st.bad_streak} in a row, "
                    f"limit --max_bad_steps {cfg.max_bad_steps})")
        if st.bad_streak < cfg.max_bad_steps:
            return
        where = (f"last good checkpoint kept: {self.last_path} (step {st.last_saved_step})"
                 if st.last_saved_step is not None else "no checkpoint had been written yet")
        write_summary(cfg.output_dir, {"status": "diverged", "step": s + 1, "skipped_steps": st.skipped_steps,
                                       "last_good_checkpoint_step": st.last_saved_step, "config": cfg.to_dict()})
        raise TrainingDiverged(f"{st.bad_streak} non-finite losses in a row (steps {s - st.bad_streak + 1}..{s}); "
                               f"stopped; {where}. Lower --blr (or --lr), --alpha_init or --clip_grad, or check the data")

    def after_step(self, s: int, lr: float) -> bool:
        """Logging, pictures, the stop vote and periodic checkpoints at a step boundary; True: stop now."""
        cfg, st = self.cfg, self.state
        if st.step % cfg.log_every == 0 or st.step == self.end_step:
            self._log_metrics(s, lr)
        if cfg.grid_every and st.step % cfg.grid_every == 0 and st.step != self.end_step:
            plain = plain_objective(cfg, self.objective, self.device)  # collective under FSDP2
            if distributed.is_main():
                self._draw_pictures(plain)
        if self.vote.agreed():  # every rank gets the same answer at the same step, so all stop together
            self._stop_at_boundary()
            return True
        # No periodic checkpoint during a run of non-finite steps: the last one before it stays the fallback.
        due = (cfg.save_every and st.step % cfg.save_every == 0) or self._epoch_checkpoint_due()
        if due and st.step != self.end_step and self._settle_steps() == 0:
            self.save()
            st.last_saved_step = st.step
        return False

    def _stop_at_boundary(self) -> None:
        """A stop request at the boundary after optimiser step ``state.step``: checkpoint, message, status."""
        st = self.state
        self.save()
        self.console.message(f"received {self.stop.name or 'stop request'}: checkpoint saved at step {st.step} "
                             f"({self.last_path}); resume with --resume auto")
        st.status, st.interrupted = f"interrupted_{self.stop.name or 'signal'}".lower(), True

    def _epoch_checkpoint_due(self) -> bool:
        """--save_ckpt_freq N: the step that completes epoch E, E a multiple of N."""
        n, spe, step = self.cfg.save_ckpt_freq, self.plan.steps_per_epoch, self.state.step
        return bool(n) and step % spe == 0 and (step // spe) % n == 0

    def _log_metrics(self, s: int, lr: float) -> None:
        """One metrics record: window means (averaged over ranks), lr, throughput; then a new window."""
        self._settle_steps()
        window = self.window
        elapsed = max(time.time() - window.start, 1e-9)
        record = {"step": self.state.step, "epoch": s // self.plan.steps_per_epoch, "lr": lr,
                  "img_per_s": window.images / elapsed, "time": time.time() - self.t_start}
        record.update(window.take_means())
        self.watch.check(self.state.step, record)
        self.metrics.log(record)
        self.console.report(self.state.step, record["epoch"], record.get("loss", float("nan")), record["img_per_s"], lr)

    def run_wall_time_s(self) -> float:
        """Seconds this run has taken: this process so far, plus the earlier processes up to the checkpoint
        this one resumed from (time they spent after their last checkpoint is not counted)."""
        return self.state.earlier_wall_time_s + time.time() - self.t_start

    def save(self) -> Optional[str]:
        """Writes last.pt (rank 0), and checkpoint-E.pt when --save_ckpt_freq asks for this epoch; collective,
        see :func:`fastebm.train.checkpoint.save_collective`."""
        self._settle_steps()  # the checkpoint lists the skipped steps
        path = save_collective(self.cfg, self.objective, self.optimizer, self.scaler, self.state, self.plan,
                               self.schedule, wall_time_s=self.run_wall_time_s())
        if path is not None and self._epoch_checkpoint_due():
            keep_epoch_checkpoint(path, self.state.step // self.plan.steps_per_epoch)
        return path

    # ------------------------------------------------------------------ the end
    def finish(self) -> Dict[str, Any]:
        """Final checkpoint, pictures, backbone and [demo] evaluation (not after a stop request); the summary."""
        cfg, st = self.cfg, self.state
        if not st.interrupted:
            self.save()
        summary = run_summary(st, self.total_steps, self.plan.steps_per_epoch, device=self.device, loader=self.loader,
                              checkpoint=self.last_path, output_dir=cfg.output_dir)
        if not st.interrupted:
            self._final_outputs(summary)
        if st.bad_files:
            log.warning(f"skipped {len(st.bad_files)} unreadable image(s), e.g. {st.bad_files[0]} (listed in summary.json)")
        # the whole run's time: a resumed run adds what its earlier processes took up to their last checkpoint
        # (one clock reading for both, so that they differ by exactly the earlier processes' time)
        summary["process_wall_time_s"] = time.time() - self.t_start
        summary["wall_time_s"] = self.state.earlier_wall_time_s + summary["process_wall_time_s"]
        summary["config"] = cfg.to_dict()
        write_summary(cfg.output_dir, summary)
        log_results(summary, cfg.output_dir)
        return summary

    def _final_outputs(self, summary: Dict[str, Any]) -> None:
        """Rank 0 draws the pictures, exports backbone.pth and evaluates the demo model (into ``summary``)."""
        from ..eval.export import export_backbone

        objective = plain_objective(self.cfg, self.objective, self.device)  # collective under FSDP2
        if not distributed.is_main():
            return
        self._draw_pictures(objective)
        summary["backbone"] = export_backbone(objective.model, os.path.join(self.cfg.output_dir, "backbone.pth"))
        if self.is_demo and self.cfg.demo_eval:
            final = demo_evaluation(objective, self.source, self.cfg, self.device)
            summary.update(compare_evaluations(self.state.eval_init, final))

    def _draw_pictures(self, objective) -> None:
        from .pictures import draw_pictures  # matplotlib: imported only when a picture is due

        draw_pictures(self.cfg, objective, self.preview, self.device, self.state.step)
