"""Round 19: the rest of the 100-label fine-tuning recipe searched on the textures at 32 px (flips, RandAugment, budget).

Round 18 searched the 100-label fine-tuning lr on the textures at their native 32 px and found it is not why timm's
random init fine-tunes above fastebm's defaults there. The digits' recipe that every arm runs has no flips (digits
are not mirror-symmetric; textures are), no RandAugment (in 1,000 steps it kept a random init near chance on the
digits) and 1,000 optimiser steps. Here those three are tried, alone and together, on the validation split of the
textures' training patches that round 18 made (``texture_ft_lr.val_split``; never the test patches):

* the arms: timm's random init and fastebm's defaults (16 px, 8 epochs), both evaluated at 32 px (arms.py:
  ``random_timm_32px``, ``fastebm_16px_8ep``), pretrained with the study's commands (seed ``--pretrain_seed``);
* each run: the study's 100-label fine-tuning (``fastebm-eval finetune --recipe small --few_shot 10``, the built-in
  base lr 32e-3) plus one cell's flags (``arms.TEXTURE_FT_CELLS``: a horizontal flip, MAE's RandAugment, 2,000
  steps instead of 1,000, all three, and a random head instead of LP-FT's probe as a check of the cause);
  fine-tuning seeds ``--seeds``; the highest mean validation
  top-1 picks each arm's recipe.

    python benchmarks/quality/texture_ft_recipe.py --out DIR [--cells builtin hflip ...] [--seeds 0 1] [--jobs 2]

Writes DIR/texture_ft_recipe.json (every run: arm, cell, seed, val top-1, train top-1, command), DIR/texture_ft_recipe.png
(validation top-1 per cell, every seed a dot) and prints the grid. Runs already finished in DIR are kept, and the split
and pretraining are the same as round 18's, so one DIR can hold both grids.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import arms as A  # noqa: E402
import texture_ft_lr as L  # noqa: E402

ARMS = ["random_timm_32px", "fastebm_16px_8ep"]
CELLS: Dict[str, List[str]] = A.TEXTURE_FT_CELLS  # cell name -> the flags it adds to the built-in recipe (arms.py)
CELL_LABELS = {"hflip_randaug_steps2000": "hflip\n+randaug\n+steps2000", "head_random": "random head\n(no LP-FT)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=sorted(A.ARMS))
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    ap.add_argument("--pretrain_seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    grid = L.run_grid(out, args.arms, {c: CELLS[c] for c in args.cells}, args.seeds, args.pretrain_seed, args.jobs)
    rows = grid["runs"]
    from report import environment

    result = {"env": environment(), "command": " ".join(["python", "benchmarks/quality/texture_ft_recipe.py", *sys.argv[1:]]),
              "cells": {c: CELLS[c] for c in args.cells}, "split": grid["split"], "val_seed": L.VAL_SEED,
              "val_tile_fraction": L.VAL_TILE_FRACTION, "pretrain_seed": args.pretrain_seed,
              "pretrain_commands": grid["pretrain_commands"], "picks": picks(rows, args.arms, args.cells), "runs": rows}
    with open(os.path.join(out, "texture_ft_recipe.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot_cells(rows, args.arms, args.cells, os.path.join(out, "texture_ft_recipe.png"))
    print(f"{'arm':20s} " + " ".join(f"{c[:12]:>12s}" for c in args.cells))
    for name in args.arms:
        means = [cell_top1(rows, name, c) for c in args.cells]
        print(f"{name:20s} " + " ".join(f"{np.mean(v):12.3f}" if v else f"{'-':>12s}" for v in means))
    print("picks:", result["picks"])
    return 0


def cell_top1(rows: List[dict], arm: str, cell: str) -> List[float]:
    """The validation top-1 of every seed of one grid cell."""
    return [r["val_top1"] for r in rows if r["arm"] == arm and r["cell"] == cell]


def picks(rows: List[dict], arm_names: List[str], cells: List[str]) -> Dict[str, str]:
    """Each arm's cell with the highest mean validation top-1 (the first listed wins a tie; cells with no finished run
    are left out, and an arm with none is left out)."""
    chosen = {}
    for name in arm_names:
        means = [(np.mean(v), -i, c) for i, c in enumerate(cells) if (v := cell_top1(rows, name, c))]
        if means:
            chosen[name] = max(means)[2]
    return chosen


def plot_cells(rows: List[dict], arm_names: List[str], cells: List[str], path: str) -> None:
    """Validation top-1 per recipe cell, one marker per arm for the mean, every seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    width = 0.8 / max(1, len(arm_names))
    for i, name in enumerate(arm_names):
        color = f"C{i}"
        xs = np.arange(len(cells)) + (i - (len(arm_names) - 1) / 2) * width
        for x, cell in zip(xs, cells):
            v = cell_top1(rows, name, cell)
            ax.scatter([x] * len(v), v, color=color, s=14, alpha=0.6)
            if v:
                ax.hlines(np.mean(v), x - width / 2.5, x + width / 2.5, color=color, lw=2)
        ax.plot([], [], "-", color=color, lw=2, label=A.ARMS[name].label if name in A.ARMS else name)
    ax.set_xticks(np.arange(len(cells)), [CELL_LABELS.get(c, c) for c in cells], fontsize=8)
    ax.set_ylabel("validation top-1 (100 labels)")
    ax.set_title("textures at 32 px: 100-label fine-tuning recipe (bar: mean; dots: seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
