"""``fastebm-train``: the pretraining command (also ``python -m fastebm train``).

This module alone turns errors into exit codes:

====  =====================================================================================
0     finished, or stopped by SIGTERM after saving a checkpoint
1     a peer process of a torchrun job died or hung (DistributedFailure; the message names it)
2     bad input: flags, config file, data folder, checkpoint, distributed set-up (UsageError,
      DataError, CheckpointError, DistributedSetupError)
3     training diverged: too many non-finite losses in a row (TrainingDiverged)
130   stopped by SIGINT after saving a checkpoint
====  =====================================================================================

Each error is printed as one line, ``fastebm-train: error: <message>``, without a traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional

from ..errors import CheckpointError, DataError, DistributedFailure, DistributedSetupError, TrainingDiverged, UsageError
from ..log import setup_logging

PROG = "fastebm-train"

log = logging.getLogger(__name__)


def _fail(exc: Exception, code: int) -> int:
    log.error(str(exc))  # printed on every rank: each reports its own failure
    return code


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging(PROG)
    from ..train.config import parse_config

    try:
        cfg = parse_config(argv)
        from ..train.trainer import train

        summary = train(cfg)
    except (UsageError, DataError, CheckpointError, DistributedSetupError) as exc:
        return _fail(exc, 2)
    except TrainingDiverged as exc:
        return _fail(exc, 3)
    except DistributedFailure as exc:
        return _fail(exc, 1)
    return 130 if summary.get("status") == "interrupted_sigint" else 0


if __name__ == "__main__":
    sys.exit(main())
