"""Shared pieces of the fastebm-restore / fastebm-score command lines: tiling flags, checks, the command as typed."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Callable, List, Optional

from ..tools.errors import ToolInputError

log = logging.getLogger(__name__)


def add_tiling_flags(parser: argparse.ArgumentParser, batch_default: int) -> None:
    parser.add_argument("--resize", action="store_true",
                        help="resize every image to the model's resolution (bilinear, antialiased) instead of "
                             "processing it tile by tile at its own size")
    parser.add_argument("--overlap", type=int, default=None,
                        help="tile overlap in px (a multiple of the patch side; default a quarter of the tile; "
                             "not with --resize)")
    parser.add_argument("--batch_size", type=int, default=batch_default, help="tiles per model call")
    parser.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda or cuda:N")


def check_tiling_flags(args, verb: str = "restores") -> None:
    """ToolInputError (one line) for ``--overlap`` together with ``--resize`` (one tile: no overlap)."""
    if args.resize and args.overlap is not None:
        raise ToolInputError(f"--overlap applies to tiling, and --resize {verb} the whole image as one tile; "
                             "drop one of them")


def positive(name: str, value: int, what: str) -> int:
    if value < 1:
        raise ToolInputError(f"--{name} must be >= 1 ({what}), got {value}")
    return value


def command_line(prog: str, argv: Optional[List[str]]) -> str:
    """The command as typed (for results files): ``prog`` and the arguments, shell-quoted."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([prog] + [shlex.quote(a) for a in args])


def skip_recorder(skipped: List[dict]) -> Callable[[str, str], None]:
    """The tools' ``on_skip(name, reason)``: appends ``{"path", "reason"}`` to ``skipped`` and warns."""
    def on_skip(name: str, reason: str) -> None:
        skipped.append({"path": name, "reason": reason})
        log.warning(f"skipped unreadable image {name}: {reason}")

    return on_skip
