"""``fastebm-export --ckpt last.pt --out model.safetensors``: the backbone for timm.

Writes the backbone under timm ``VisionTransformer`` names (``.safetensors``, the default, or
``.pth``) and a JSON sidecar with the timm architecture name, image size, patch size and input
normalisation (see :mod:`fastebm.eval.export`). Exit codes: 0 written, 2 bad input (missing,
truncated or foreign checkpoint, unknown output format); nothing is written on error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

PROG = "fastebm-export"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        from ..errors import UsageError

        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Export a fastebm backbone (training checkpoint or backbone.pth) for timm.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="fastebm training checkpoint (last.pt) or a backbone file")
    p.add_argument("--out", default="model.safetensors", help="output file: .safetensors (no pickle) or .pth; "
                   "the sidecar goes next to it with the extension .json")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from ..errors import UsageError
    from ..eval.export import export_checkpoint, sidecar_path

    try:
        args = build_parser().parse_args(argv)
        if os.path.abspath(args.out) == os.path.abspath(args.ckpt):
            raise UsageError(f"--out {args.out} is the input checkpoint; choose another file name")
        out = export_checkpoint(args.ckpt, args.out)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # output folder missing or read-only, disk full
        print(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 2
    print(f"{PROG}: wrote {out} and {sidecar_path(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
