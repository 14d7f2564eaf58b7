"""One training process from start to end: :func:`train`, the frame around a
:class:`~fastebm.train.trainer.Trainer`.

It installs the SIGTERM/SIGINT handling first (a signal during start-up ends the run cleanly too),
joins the process group under torchrun, sets the CPU threads, runs the Trainer, turns a start-up
interruption into its one line and summary, names a dead or hung peer, and leaves the group.
"""
from __future__ import annotations

from typing import Any, Dict

from .. import distributed
from ..errors import DistributedFailure, FastEBMError
from ..threads import configure_threads
from .config import TrainConfig
from ..signals import StartupInterrupted, StopRequest
from .summary import interrupted_before_training
from .trainer import Trainer


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Runs one training job as configured; returns the summary (also written to summary.json).

    Under torchrun every process calls this: it joins the process group (NCCL on CUDA, gloo on
    CPU), trains its slice of every global batch under DDP (or FSDP2 with ``--fsdp``) and leaves
    the group at the end. Raises the errors of :mod:`fastebm.errors`: UsageError, DataError,
    CheckpointError, TrainingDiverged, DistributedSetupError, and DistributedFailure naming the
    peer that died or hung.
    """
    owns_group = not distributed.is_initialized()
    # Installed first: a signal during start-up (data scan, demo evaluation) ends the run cleanly too.
    stop = StopRequest(immediate=not distributed.launched_by_torchrun()).install()
    trainer, info = None, None
    try:
        info = distributed.init_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout)
        configure_threads(None if cfg.threads == "auto" else int(cfg.threads), info.local_world_size)
        stop.immediate = not info.distributed  # several processes leave start-up together (Trainer._startup_vote)
        trainer = Trainer(cfg, info, stop)
        return trainer.run()
    except StartupInterrupted as exc:
        if trainer is not None and hasattr(trainer, "metrics"):
            trainer.metrics.close()
        resumed = trainer.resumed_from if trainer is not None else None
        return interrupted_before_training(cfg, exc.name, trainer.state.step if resumed else 0, resumed)
    except (FastEBMError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if info is not None and info.distributed and distributed.is_collective_failure(exc):
            raise DistributedFailure(distributed.explain_failure(exc)) from exc
        raise
    finally:
        stop.uninstall()
        if owns_group:
            distributed.destroy_distributed()
