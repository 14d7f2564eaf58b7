"""``fastebm-train``: the pretraining command (also ``python -m fastebm train``).

Exit codes and error lines as every command's (:mod:`fastebm.cli._run`): 0 finished or stopped by
SIGTERM, 1 a peer process of a torchrun job died or hung, 2 bad input (flags, config file, data
folder, checkpoint, output folder, distributed set-up), 3 training diverged, 130 stopped by SIGINT.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ._run import run

PROG = "fastebm-train"


def _train(argv: Optional[List[str]]) -> dict:
    from ..train.config import parse_config

    cfg = parse_config(argv)
    from ..train.job import train

    return train(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    return run(PROG, lambda: _train(argv))


if __name__ == "__main__":
    sys.exit(main())
