"""``python -m fastebm COMMAND [flags]``: runs a fastebm command (``train`` == ``fastebm-train``)."""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from .cli import COMMANDS


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: python -m fastebm {{{','.join(COMMANDS)}}} [flags]  (COMMAND --help for its flags)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"fastebm {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"fastebm: error: {what}; choose one of {', '.join(COMMANDS)} ({usage})", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
