"""``fastebm-export --ckpt last.pt --out model.safetensors``: the backbone for timm.

Writes the backbone under timm ``VisionTransformer`` names (``.safetensors``, the default, or
``.pth``) and a JSON sidecar with the timm architecture name, image size, patch size and input
normalisation (see :mod:`fastebm.eval.export`). Exit codes (:mod:`fastebm.cli._run`): 0 written,
2 bad input (a missing, truncated or foreign checkpoint; a folder, whose message names the checkpoint
files in it; a file of pickled Python objects, named by their classes; an unknown output format; an
output that cannot be written); nothing is written on error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ..settings import ArgumentParser, FieldHelpFormatter
from ._run import run

PROG = "fastebm-export"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Export a fastebm backbone (training checkpoint or backbone.pth) for timm.",
                       formatter_class=FieldHelpFormatter)
    p.add_argument("--ckpt", required=True, help="fastebm training checkpoint (last.pt) or a backbone file")
    p.add_argument("--out", default="model.safetensors", help="output file: .safetensors (no pickle) or .pth; "
                   "the sidecar goes next to it with the extension .json")
    return p


def _export(argv: Optional[List[str]]) -> None:
    from ..errors import UsageError
    from ..eval.export import export_checkpoint, sidecar_path

    args = build_parser().parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.ckpt):
        raise UsageError(f"--out {args.out} is the input checkpoint; choose another file name")
    out = export_checkpoint(args.ckpt, args.out)  # writes fail as OutputError naming the file
    print(f"{PROG}: wrote {out} and {sidecar_path(out)}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    return run(PROG, lambda: _export(argv))


if __name__ == "__main__":
    sys.exit(main())
