"""``fastebm-eval finetune|linprobe|knn``: downstream evaluation of a pretrained backbone.

Exit codes (:mod:`fastebm.cli._run`): 0 finished (or stopped by SIGTERM; resume with ``--resume
auto``), 1 a peer process of a torchrun job died or hung, 2 bad input (flags, config file,
checkpoint, data folder), 3 fine-tuning diverged (non-finite loss), 130 stopped by SIGINT.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ._run import run

PROG = "fastebm-eval"


def _evaluate(argv: Optional[List[str]]) -> dict:
    from ..eval.config import parse_args

    command, cfg = parse_args(argv)
    from ..eval import run as run_evaluation

    return run_evaluation(command, cfg)


def main(argv: Optional[List[str]] = None) -> int:
    return run(PROG, lambda: _evaluate(argv))


if __name__ == "__main__":
    sys.exit(main())
