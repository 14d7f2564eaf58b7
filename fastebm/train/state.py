"""What the training loop carries from one optimiser step to the next (modules and optimiser aside)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional


@dataclass
class LoopState:
    """The loop-carried state of one run, in one place.

    ``step``, ``bad_files``, ``skipped_steps`` and ``eval_init`` are saved in checkpoints and
    restored on resume, and so is the run's wall time (``earlier_wall_time_s`` after a resume);
    the other fields describe this process's run since it started.
    """

    step: int = 0  # optimiser steps done
    bad_files: List[str] = field(default_factory=list)  # unreadable images met so far (names, first-seen order)
    skipped_steps: List[int] = field(default_factory=list)  # steps skipped for a non-finite loss or gradient
    eval_init: Dict[str, Any] = field(default_factory=dict)  # the demo's evaluation of the initial model
    # wall seconds of the run's earlier processes, up to the checkpoint this one resumed from (0 for a fresh run)
    earlier_wall_time_s: float = 0.0
    # how the run is going
    bad_streak: int = 0  # non-finite steps in a row (as of the last read of the device-side verdicts)
    last_saved_step: Optional[int] = None  # step of the newest checkpoint this run wrote or resumed from
    status: str = "completed"  # summary.json's status if the loop ends now
    interrupted: bool = False  # stopped by SIGTERM/SIGINT (its checkpoint is already written)
    # the optimiser step and the metrics window: on the device, in fastebm.train.window.MetricsWindow

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any]) -> "LoopState":
        step = int(ckpt["step"])
        return cls(step=step, bad_files=list(ckpt.get("bad_files", [])), skipped_steps=list(ckpt.get("skipped_steps", [])),
                   eval_init=dict(ckpt.get("eval_init", {})), last_saved_step=step,
                   earlier_wall_time_s=float(ckpt.get("wall_time_s", 0.0)))

    def add_bad_files(self, files: Iterable[str]) -> None:
        known = set(self.bad_files)
        self.bad_files.extend(b for b in dict.fromkeys(files) if b not in known)
