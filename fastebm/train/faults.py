"""Fault handling: stop requests from signals and a NaN-injection test hook.

Non-finite losses are handled by the loop (:class:`fastebm.train.trainer.Trainer`), which raises
:class:`fastebm.errors.TrainingDiverged` after ``--max_bad_steps`` of them in a row.
"""
from __future__ import annotations

import os
import signal
from typing import Optional, Set

INJECT_ENV = "FASTEBM_INJECT_NAN_AT_STEP"


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits.

    A second SIGINT (Ctrl-C twice) restores the default behaviour and interrupts at once.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()


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
