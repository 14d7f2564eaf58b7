"""What the training loop carries from one optimiser step to the next (modules and optimiser aside)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional


@dataclass
class LoopState:
    """The loop-carried state of one run, in one place.

    ``step``, ``bad_files``, ``skipped_steps`` and ``eval_init`` are saved in checkpoints and
    restored on resume; the other fields describe this process's run since it started.
    """

    step: int = 0  # optimiser steps done
    bad_files: List[str] = field(default_factory=list)  # unreadable images met so far (names, first-seen order)
    skipped_steps: List[int] = field(default_factory=list)  # steps skipped for a non-finite loss or gradient
    eval_init: Dict[str, Any] = field(default_factory=dict)  # the demo's evaluation of the initial model
    # how the run is going
    bad_streak: int = 0  # non-finite steps in a row
    last_saved_step: Optional[int] = None  # step of the newest checkpoint this run wrote or resumed from
    status: str = "completed"  # summary.json's status if the loop ends now
    interrupted: bool = False  # stopped by SIGTERM/SIGINT (its checkpoint is already written)
    # the optimiser step being accumulated over micro-batches
    step_ok: bool = True
    step_loss: float = 0.0
    step_stats: Dict[str, float] = field(default_factory=dict)
    # the metrics window since the last log line
    window: Dict[str, List[float]] = field(default_factory=dict)
    window_images: int = 0
    window_start: float = field(default_factory=time.time)

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any]) -> "LoopState":
        step = int(ckpt["step"])
        return cls(step=step, bad_files=list(ckpt.get("bad_files", [])), skipped_steps=list(ckpt.get("skipped_steps", [])),
                   eval_init=dict(ckpt.get("eval_init", {})), last_saved_step=step)

    def add_bad_files(self, files: Iterable[str]) -> None:
        known = set(self.bad_files)
        self.bad_files.extend(b for b in dict.fromkeys(files) if b not in known)

    def start_step(self) -> None:
        """Before the first micro-batch of an optimiser step."""
        self.step_ok, self.step_loss, self.step_stats = True, 0.0, {}

    def add_micro_step(self, loss: float, stats: Dict[str, float], accum_iter: int) -> None:
        """Adds one finite micro-batch's loss and statistics (each weighted 1/accum_iter)."""
        self.step_loss += loss / accum_iter
        for k, v in stats.items():
            self.step_stats[k] = self.step_stats.get(k, 0.0) + v / accum_iter

    def record_good_step(self, grad_norm: float) -> None:
        """An optimiser step that updated the weights: ends a non-finite streak, joins the metrics window."""
        self.bad_streak = 0
        for k, v in self.step_stats.items():
            self.window.setdefault(k, []).append(v)
        self.window.setdefault("loss", []).append(self.step_loss)
        self.window.setdefault("grad_norm", []).append(grad_norm)

    def reset_window(self) -> None:
        self.window, self.window_images, self.window_start = {}, 0, time.time()
