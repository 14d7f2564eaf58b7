"""Fault handling in training: the stop vote across ranks, a warning for restorations that make
images worse, and a NaN-injection test hook (stop requests from signals are :mod:`fastebm.signals`).

Non-finite losses are handled by the loop (:class:`fastebm.train.trainer.Trainer`), which raises
:class:`fastebm.errors.TrainingDiverged` after ``--max_bad_steps`` of them in a row.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any, Deque, Dict, Optional, Set, Tuple

import torch

from .. import distributed
from ..signals import StopRequest

log = logging.getLogger(__name__)

INJECT_ENV = "FASTEBM_INJECT_NAN_AT_STEP"


class StopVote:
    """A :class:`StopRequest` agreed across ranks at step boundaries, without a collective or a
    device sync of its own.

    Without a process group the answer is the request's own flag (a Python bool; nothing is read
    from the device). With one, the local request rides in the optimiser step's one all-reduce
    (:meth:`flags` appends it to the skip flag) and is read a step later: :meth:`post` queues a
    copy of the agreed flag to host memory behind that all-reduce, and :meth:`agreed` at the next
    step boundary waits for that copy only (a CUDA event), not for the step queued since. That read
    is the loop's one host read per optimiser step between log steps. Every rank reads the same
    all-reduced value at the same boundary, so all stop together, one or two boundaries after the
    signal (one when it arrives before the step's all-reduce, two when between it and the boundary).
    """

    def __init__(self, stop: StopRequest):
        self.stop = stop
        self.collective = distributed.is_initialized()
        self._pending: Deque[Tuple[torch.Tensor, Any]] = collections.deque()

    def flags(self, bad: torch.Tensor) -> torch.Tensor:
        """The step's flags to all-reduce: ``[bad]``, and ``[bad, stop requested here]`` with a process group."""
        bad = bad.reshape(1)
        if not self.collective:
            return bad
        stop = torch.full((1,), self.stop.requested, dtype=torch.bool, device=bad.device)  # a fill: no copy, no sync
        return torch.cat((bad, stop))

    def post(self, agreed: torch.Tensor) -> None:
        """Keeps this step's all-reduced :meth:`flags` for :meth:`agreed` at the next boundary; reads nothing."""
        if not self.collective:
            return
        flag, done = agreed[1], None
        if flag.is_cuda:
            flag = flag.to("cpu", non_blocking=True)  # into pinned host memory, queued behind the all-reduce
            done = torch.cuda.Event()
            done.record()
        self._pending.append((flag, done))

    def agreed(self) -> bool:
        """True: stop at this boundary (the same answer on every rank)."""
        if not self.collective:
            return self.stop.requested
        if len(self._pending) < 2:  # only this step's vote is in: it is read at the next boundary
            return False
        flag, done = self._pending.popleft()
        if done is not None:
            done.synchronize()  # the previous step's copy, not the work queued after it
        return bool(flag)


class RestorationWatch:
    """Warns (once per run) when the restored images stay far worse than the corrupted input.

    A finite but useless restoration (e.g. step sizes stuck far too large after a bad
    ``--alpha_init``: loss 100-700x the corrupted input's) trains without any non-finite value,
    so nothing else would say so. Checked per logging window, on the window means of the last
    step's loss ``loss_t/T`` and of ``loss_corrupted`` (the input's own loss), for windows that
    start after the warm-up: the warning fires when the ratio exceeds ``factor``.
    """

    def __init__(self, warmup_steps: int, factor: float = 10.0):
        self.warmup_steps = warmup_steps
        self.factor = factor
        self.window_start = 0
        self.warned = False

    def check(self, step: int, record: Dict[str, Any]) -> Optional[float]:
        """``record``: one metrics line (window means) ending at optimiser step ``step``. Returns the ratio
        that triggered a warning, else None."""
        start, self.window_start = self.window_start, step
        key = last_step_loss_key(record)
        if self.warned or start < self.warmup_steps or key is None or not record.get("loss_corrupted"):
            return None
        ratio = record[key] / record["loss_corrupted"]
        if not ratio > self.factor:
            return None
        self.warned = True
        log.warning(f"steps {start + 1}-{step}: the restored images are {ratio:.0f}x worse than the corrupted input "
                    f"({key} {record[key]:.3g} vs loss_corrupted {record['loss_corrupted']:.3g}): the restoration "
                    f"step sizes are probably far too large; lower --alpha_init or --blr (warned once)")
        return ratio


def last_step_loss_key(record: Dict[str, Any]) -> Optional[str]:
    """The metrics key of the loss after the last restoration step: ``loss_t`` (T = 1) or ``loss_t/T``."""
    if "loss_t" in record:
        return "loss_t"
    steps = [int(k[7:]) for k in record if k.startswith("loss_t/") and k[7:].isdigit()]
    return f"loss_t/{max(steps)}" if steps else None


def injected_nan_steps() -> Set[int]:
    """Testing aid: optimiser steps whose loss is replaced by NaN, from FASTEBM_INJECT_NAN_AT_STEP.

    Syntax: comma-separated steps and inclusive ranges, e.g. ``3`` or ``3,7`` or ``4-20``.
    """
    text = os.environ.get(INJECT_ENV, "").strip()
    steps: Set[int] = set()
    if not text:
        return steps
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                steps.update(range(int(a), int(b) + 1))
            else:
                steps.add(int(part))
        except ValueError:
            raise ValueError(f"{INJECT_ENV}={text!r}: expected steps like '3', '3,7' or '4-20'") from None
    return steps
