"""What SIGTERM and SIGINT do to a run (training or evaluation), whichever process of the job they reach.

Shared by ``fastebm.train`` and ``fastebm.eval``; imports nothing from fastebm.
"""
from __future__ import annotations

import signal
from typing import Optional


class StartupInterrupted(BaseException):
    """SIGTERM/SIGINT before the first training step: nothing to save, the run ends at once.

    A ``BaseException`` (like ``KeyboardInterrupt``) because it is raised from a signal handler
    anywhere in the start-up code, and ``except Exception`` blocks there must not swallow it.
    """

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class StopRequest:
    """What SIGTERM and SIGINT do to a run, whichever process of the job they reach first.

    During start-up with ``immediate`` (one process: data scan, model build, resume, the demo's
    initial evaluation), the handler raises :class:`StartupInterrupted` at once. Otherwise it sets
    a flag: the loop saves a checkpoint at the next step boundary and exits (multi-process start-up
    polls the flag at fixed points, so that every rank leaves together). A second SIGINT (Ctrl-C
    twice) restores the default behaviour and interrupts at once. Data-loader worker processes
    ignore both signals (``fastebm.data.loader.ignore_stop_signals``): the main process owns shutdown.
    """

    def __init__(self, immediate: bool = False):
        self.signum: Optional[int] = None
        self.immediate = immediate
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig in self._previous:
                continue
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
        if self.immediate:
            raise StartupInterrupted(self.name)

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
