"""How every fastebm command ends: one table from errors to exit codes, one error line.

Each command's ``main(argv)`` is ``run(PROG, body)``; ``body`` parses the flags, does the work and
returns the command's summary (or None). This is the only place that turns errors into exit codes:

====  =====================================================================================
0     finished, or stopped by SIGTERM (after saving a checkpoint; during start-up: nothing to save)
1     a peer process of a torchrun job died or hung (DistributedFailure; the message names it)
2     bad input: flags, config file, data folder, checkpoint, an output folder that holds a run
      or cannot be written, distributed set-up (UsageError, including the tools'
      ToolInputError; DataError, CheckpointError, OutputError, DistributedSetupError), or an
      OSError about a file the command reads or writes (the message names the path)
3     training diverged: too many non-finite losses in a row (TrainingDiverged)
130   stopped by SIGINT (the summary's ``status`` is ``interrupted_sigint``; saved like SIGTERM), or
      Ctrl-C in a command without step boundaries (knn, linprobe, restore, score), one line
====  =====================================================================================

Each error is printed as one line, ``PROG: error: <message>``, without a traceback, by every rank
(each reports its own failure); terminal escape sequences that some library messages carry are
removed (:func:`fastebm.log.one_line`). ``--help`` and ``--version`` print their text and return
argparse's exit status (0). Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from ..errors import (CheckpointError, DataError, DistributedFailure, DistributedSetupError, OutputError,
                      TrainingDiverged, UsageError)
from ..log import one_line, setup_logging

__all__ = ["run", "exit_code", "EXIT_CODES", "INTERRUPTED"]

log = logging.getLogger(__name__)

EXIT_CODES = (
    ((UsageError, DataError, CheckpointError, OutputError, DistributedSetupError), 2),
    ((TrainingDiverged,), 3),
    ((DistributedFailure,), 1),
)
INTERRUPTED = {"interrupted_sigint": 130}  # summary status -> exit code; any other status: 0


def exit_code(exc: BaseException) -> Optional[int]:
    """The exit code of an error the commands report in one line; None for any other exception."""
    for classes, code in EXIT_CODES:
        if isinstance(exc, classes):
            return code
    if isinstance(exc, OSError) and exc.filename:  # not about a file (e.g. a broken connection): a real bug
        return 2
    return None


def _message(exc: BaseException) -> str:
    text = str(exc)
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        # torch re-raises a worker's error with the worker's traceback as its message: keep the
        # original error's own text (the last line, "module.Class: message")
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return last.split(": ", 1)[1] if ": " in last else last
    if isinstance(exc, OSError) and not isinstance(exc, OutputError):
        # An unexpected file-system error (no OutputError was raised for it): name the path(s).
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        return f"cannot access {where}: {exc.strerror or exc}"
    return str(exc)


def run(prog: str, body: Callable[[], Any]) -> int:
    """Sets up the console for command ``prog`` (:func:`fastebm.log.setup_logging`: warnings as
    ``PROG: warning: ...``), runs ``body()`` and returns the exit code (table above)."""
    setup_logging(prog)
    try:
        summary = body()
    except SystemExit as exc:  # --help, --version: argparse printed its text
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:  # Ctrl-C where the command does not stop at a step boundary (or a second Ctrl-C)
        log.error("stopped by Ctrl-C (SIGINT) before the end; files already written are complete, the rest were not written")
        return 130
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        log.error(one_line(_message(exc)))
        return code
    status = summary.get("status") if isinstance(summary, dict) else None
    return INTERRUPTED.get(status, 0)
