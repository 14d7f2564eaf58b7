"""``fastebm-train``: the pretraining command (also ``python -m fastebm train``).

This module alone turns errors into exit codes:

====  =====================================================================================
0     finished, or stopped by SIGTERM (after saving a checkpoint; during start-up: nothing to save)
1     a peer process of a torchrun job died or hung (DistributedFailure; the message names it)
2     bad input: flags, config file, data folder, checkpoint, an output folder that holds a run
      or cannot be written, distributed set-up (UsageError, DataError, CheckpointError,
      OutputError, DistributedSetupError)
3     training diverged: too many non-finite losses in a row (TrainingDiverged)
130   stopped by SIGINT (after saving a checkpoint; during start-up: nothing to save)
====  =====================================================================================

Each error is printed as one line, ``fastebm-train: error: <message>``, without a traceback
(terminal escape sequences that some library messages carry are removed).
"""
from __future__ import annotations

import logging
import re
import sys
from typing import List, Optional

from ..errors import (CheckpointError, DataError, DistributedFailure, DistributedSetupError, OutputError,
                      TrainingDiverged, UsageError)
from ..log import setup_logging

PROG = "fastebm-train"

log = logging.getLogger(__name__)

# CSI sequences (colours, bold: ESC [ ... letter), other ESC sequences, then any control character left.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|[\x00-\x08\x0b-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` as one plain line: escape sequences removed, line breaks and tabs folded into spaces."""
    return " ".join(_ESCAPES.sub("", str(text).replace("\t", " ")).split())


def _fail(exc: BaseException, code: int) -> int:
    log.error(one_line(exc))  # printed on every rank: each reports its own failure
    return code


def _os_error(exc: OSError) -> str:
    """An unexpected file-system error as one line naming the path (no OutputError was raised for it)."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    return f"cannot access {where}: {exc.strerror or exc}"


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging(PROG)
    from ..train.config import parse_config

    try:
        cfg = parse_config(argv)
        from ..train.job import train

        summary = train(cfg)
    except SystemExit as exc:  # --help, --version: argparse printed its text
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, DataError, CheckpointError, OutputError, DistributedSetupError) as exc:
        return _fail(exc, 2)
    except TrainingDiverged as exc:
        return _fail(exc, 3)
    except DistributedFailure as exc:
        return _fail(exc, 1)
    except OSError as exc:
        if not exc.filename:  # not about a file fastebm names (e.g. a broken connection): a real bug
            raise
        return _fail(OutputError(_os_error(exc)), 2)
    return 130 if summary.get("status") == "interrupted_sigint" else 0


if __name__ == "__main__":
    sys.exit(main())
