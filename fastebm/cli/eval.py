"""``fastebm-eval finetune|linprobe|knn``: downstream evaluation of a pretrained backbone.

Exit codes: 0 finished (or stopped by SIGTERM; resume with ``--resume auto``), 1 a peer process
of a torchrun job died or hung, 2 bad input (flags, config file, checkpoint, data folder), 3
fine-tuning diverged (non-finite loss), 130 stopped by SIGINT.
"""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional

PROG = "fastebm-eval"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    from ..data.errors import DataError
    from ..errors import UsageError
    from ..eval.config import parse_args

    warnings.formatwarning = lambda msg, category, *a, **k: f"{PROG}: warning: {msg}\n"
    try:
        command, cfg = parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)

    from ..errors import DistributedFailure
    from ..eval import run
    from ..errors import TrainingDiverged

    try:
        summary = run(command, cfg)
    except (UsageError, DataError) as exc:
        return _fail(str(exc), 2)
    except TrainingDiverged as exc:
        return _fail(str(exc), 3)
    except DistributedFailure as exc:
        return _fail(str(exc), 1)
    return 130 if summary.get("status") == "interrupted_sigint" else 0


if __name__ == "__main__":
    sys.exit(main())
