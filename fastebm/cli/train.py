"""``fastebm-train``: the pretraining command (also ``python -m fastebm.train``).

Exit codes: 0 finished (or stopped by SIGTERM after saving a checkpoint), 1 a peer process of a
torchrun job died or hung (the message names it), 2 bad input (flags, config file, data folder,
checkpoint, distributed set-up), 3 training diverged (too many non-finite losses in a row),
130 stopped by SIGINT after saving a checkpoint.
"""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional

PROG = "fastebm-train"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    from ..data.errors import DataError
    from ..train.config import UsageError, parse_config

    warnings.formatwarning = lambda msg, category, *a, **k: f"{PROG}: warning: {msg}\n"
    try:
        cfg = parse_config(argv)
    except UsageError as exc:
        return (_fail(str(exc), 2))

    from ..distributed import DistributedFailure
    from ..train.faults import TrainingDiverged
    from ..train.loop import train

    try:
        summary = train(cfg)
    except (UsageError, DataError) as exc:
        return (_fail(str(exc), 2))
    except TrainingDiverged as exc:
        return (_fail(str(exc), 3))
    except DistributedFailure as exc:
        return (_fail(str(exc), 1))
    return (130 if summary.get("status") == "interrupted_sigint" else 0)


if __name__ == "__main__":
    sys.exit(main())
