"""Console messages of fastebm's commands, through :mod:`logging`.

Modules log to ``logging.getLogger(__name__)`` (the ``fastebm`` tree). A command calls
:func:`setup_logging` once; it attaches one handler to the ``fastebm`` logger:

* INFO goes to stdout as written; WARNING to stderr as ``PROG: warning: text``; ERROR to stderr as
  ``PROG: error: text``. The streams are looked up per message, so a redirected ``sys.stdout``
  (pytest's capture, a notebook) receives them.
* One rank filter: under ``torchrun`` only rank 0 prints INFO and WARNING (every rank would print
  the same text); ERROR passes on every rank, since each rank reports its own failure.
* Python warnings (``warnings.warn``, from fastebm or its libraries) stay with Python's warnings
  machinery, so callers can still filter or record them (``pytest.warns``); they are shown with the
  same ``PROG: warning:`` prefix, on stderr, by every rank that raises one.

Library use without :func:`setup_logging` prints nothing below WARNING, as usual for logging.
:func:`one_line` makes any message (an exception's, a library's) one plain console line.
"""
from __future__ import annotations

import logging
import re
import sys
import warnings

from .distributed.process import is_main

__all__ = ["setup_logging", "one_line"]

_ROOT = "fastebm"

# CSI sequences (colours, bold: ESC [ ... letter), other ESC sequences, then any control character left.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|[\x00-\x08\x0b-\x1f\x7f]")


def one_line(text) -> str:
    """``str(text)`` as one plain line: terminal escape sequences and control characters (that some
    library messages carry) removed, line breaks and tabs folded into single spaces."""
    return " ".join(_ESCAPES.sub("", str(text).replace("\t", " ")).split())


class _RankZeroFilter(logging.Filter):
    """Lets INFO/WARNING through on the main process only; errors on every process."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or is_main()


class _ConsoleHandler(logging.Handler):
    """stdout for information, stderr with a ``PROG: warning:`` / ``PROG: error:`` prefix otherwise."""

    def __init__(self, prog: str):
        super().__init__(level=logging.INFO)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                stream, text = sys.stderr, f"{self.prog}: error: {text}"
            elif record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"{self.prog}: warning: {text}"
            else:
                stream = sys.stdout
            print(text, file=stream, flush=True)
        except Exception:
            self.handleError(record)


def setup_logging(prog: str) -> logging.Logger:
    """Routes the ``fastebm`` loggers to the console for command ``prog``; prefixes Python warnings.

    Idempotent: calling it again (e.g. ``main`` run twice in one process) only updates ``prog``.
    Returns the ``fastebm`` logger.
    """
    logger = logging.getLogger(_ROOT)
    handler = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler(prog)
        handler.addFilter(_RankZeroFilter())
        logger.addHandler(handler)
    handler.prog = prog
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{prog}: warning: {message}\n"
    return logger
