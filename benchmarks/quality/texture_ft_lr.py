"""Round 18: the 100-label fine-tuning lr searched on the textures at 32 px, one grid for every arm.

Rounds 16-17 found that at the textures' native 32 px no pretrained backbone fine-tunes above timm's random
init with 100 labels, all at the digits' built-in base lr (recipes.BLR_FEW, chosen at 32 px on the digits'
validation split). Is that the lr? Here the base lr is chosen for each arm on a validation split of the
TEXTURES' training patches, never their test patches:

* the split: each class's training tiles (textures.py: 64 px tiles, disjoint from the test tiles) are
  divided again with a fixed draw (``VAL_SEED``): ``VAL_TILE_FRACTION`` of them (at least one) give the
  validation patches, the rest the training patches, so no validation patch overlaps a training patch;
* the arms: timm's random init, fastebm's defaults (16 px, 8 epochs) and MAE at 32 px for the same training
  FLOPs, all evaluated at 32 px (arms.py: ``random_timm_32px``, ``fastebm_16px_8ep``, ``mae_flops``), with
  the study's pretraining commands (seed ``--pretrain_seed``);
* each run: the study's 100-label fine-tuning (``fastebm-eval finetune --recipe small --few_shot 10``) with
  ``--blr`` from the grid; fine-tuning seeds ``--seeds``; the mean validation top-1 picks each arm's lr.

    python benchmarks/quality/texture_ft_lr.py --out DIR [--blr 0.008 0.016 0.032 0.064] [--seeds 0 1] [--jobs 2]

Writes DIR/texture_ft_lr.json (every run: arm, blr, seed, val top-1, train top-1, command), DIR/texture_ft_lr.png
(validation top-1 against the lr) and prints the grid.
Runs already finished in DIR are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import arms as A  # noqa: E402
import textures as T  # noqa: E402

ARMS = ["random_timm_32px", "fastebm_16px_8ep", "mae_flops"]
GRID = [0.008, 0.016, 0.032, 0.064]
VAL_TILE_FRACTION = 0.3
VAL_SEED = 20261218  # this split's own draw, independent of textures.SPLIT_SEED and of any run's seed


def val_split() -> Dict[str, np.ndarray]:
    """The texture training patches divided by tile: {"x_train", "y_train", "x_val", "y_val"} (uint8 / int64) and
    "is_val" (bool, one per patch of ``textures.texture_split``'s training set, in its order)."""
    x, y, _, _, regions = T.texture_split(return_regions=True)
    rng = np.random.default_rng(VAL_SEED)
    is_val = np.zeros(len(y), dtype=bool)
    start = 0
    for name in T.CLASSES:
        tiles, corners = regions[name]["train_tiles"], regions[name]["train_corners"]
        n_val = max(1, int(round(VAL_TILE_FRACTION * len(tiles))))
        held = {tiles[i] for i in rng.permutation(len(tiles))[:n_val]}
        # a window lies inside one tile, so its corner names the tile
        is_val[start:start + len(corners)] = [(int(r) // T.TILE * T.TILE, int(c) // T.TILE * T.TILE) in held for r, c in corners]
        start += len(corners)
    return {"x_train": x[~is_val], "y_train": y[~is_val], "x_val": x[is_val], "y_val": y[is_val], "is_val": is_val}


def write_val_split(out: str) -> Dict[str, int]:
    """Writes the split as ``out/{train,val}/<class>/<n>.png`` (once; a finished split is kept); returns the counts."""
    from PIL import Image

    split = val_split()
    done = os.path.join(out, "DONE")
    counts = {part: int(len(split[f"y_{part}"])) for part in ("train", "val")}
    if not os.path.exists(done):
        for part in ("train", "val"):
            for i, (img, label) in enumerate(zip(split[f"x_{part}"], split[f"y_{part}"])):
                folder = os.path.join(out, part, T.CLASSES[label])
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(img, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
        with open(done, "w") as fh:
            json.dump(counts, fh)
    return counts


def run_logged(cmds: List[List[str]], log_path: str, env: Dict[str, str]) -> int:
    """Runs ``cmds`` one after another at low priority, output to ``log_path``; the first non-zero exit status, or 0."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        for cmd in cmds:
            rc = subprocess.run(["nice", "-n", "10", *cmd], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc:
                return rc
    return 0


def finetune_command(arm: str, pretrain_seed: int, pretrain_dir: str, seed: int, budget, flags: List[str],
                     run_dir: str) -> List[str]:
    """The study's 100-label fine-tuning of ``arm`` (``fastebm-eval finetune ... --few_shot 10``) on the split that
    ``budget`` (an ``arms.Budget``) names, with ``flags`` added after the study's own (so they win), as a command list."""
    return [sys.executable, "-m", "fastebm", "eval", "finetune", *A.source_flags(A.ARMS[arm], pretrain_seed, pretrain_dir),
            "--seed", str(seed), *budget.eval_data_flags(), "--few_shot", "10", *flags, "--output_dir", run_dir]


def run_grid(out: str, arm_names: List[str], cells: Dict[str, List[str]], seeds: List[int], pretrain_seed: int = 0,
             jobs: int = 2) -> Dict:
    """Pretrains each arm (seed ``pretrain_seed``) on the split's training patches and fine-tunes it with the study's
    100-label command plus each cell's flags, for every fine-tuning seed; runs already finished in ``out`` are kept.

    Returns {"split": counts, "pretrain_commands": {arm: command or None}, "runs": [dict(arm, cell, seed, val_top1,
    train_top1, wall_s, command)]}, the runs of failed jobs left out (each failure is printed with its log's path).
    Raises SystemExit when a pretraining fails (no fine-tuning is meaningful without it)."""
    import run as R

    split = os.path.join(out, "split")
    counts = write_val_split(split)
    print(f"validation split: {counts['train']} training / {counts['val']} validation patches", flush=True)
    budget = A.Budget(data_dir=split)
    fl = R.flops_table(arm_names, budget)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    pretrain = {}  # arm -> (its pretraining folder, its command or None)
    for name in arm_names:
        arm = A.ARMS[name]
        base = A.ARMS[arm.pretrain_name]
        pdir = os.path.join(out, "pretrain", f"{base.name}_s{pretrain_seed}")
        pretrain[name] = (pdir, A.pretrain_command(base, pretrain_seed, pdir, budget, fl["arms"].get(name, {}).get("epochs")))
    # pretraining first (two at a time), then every fine-tuning
    with ThreadPoolExecutor(jobs) as pool:
        todo = [(p, c) for p, c in pretrain.values() if c is not None and not os.path.exists(os.path.join(p, "backbone.pth"))]
        for (pdir, cmd), rc in zip(todo, pool.map(lambda pc: run_logged([pc[1]], pc[0] + ".log", env), todo)):
            if rc:
                raise SystemExit(f"FAILED pretraining {pdir} (exit {rc}; see {pdir}.log)")
    grid = []
    for name in arm_names:
        pdir = pretrain[name][0]
        for cell, flags in cells.items():
            for seed in seeds:
                run_dir = os.path.join(out, "ft", f"{name}_{cell}_s{seed}")
                grid.append((name, cell, seed, run_dir, finetune_command(name, pretrain_seed, pdir, seed, budget, flags, run_dir)))

    def run(job):
        name, cell, seed, run_dir, cmd = job
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            return f"kept {run_dir}"
        rc = run_logged([cmd], run_dir + ".log", env)
        return f"done {run_dir}" if rc == 0 else f"FAILED {run_dir} (exit {rc}; see {run_dir}.log)"

    with ThreadPoolExecutor(jobs) as pool:
        for status in pool.map(run, grid):
            print(status, flush=True)
    rows = []
    for name, cell, seed, run_dir, cmd in grid:
        try:
            with open(os.path.join(run_dir, "summary.json")) as fh:
                s = json.load(fh)
        except OSError:
            continue
        rows.append(dict(arm=name, cell=cell, seed=seed, val_top1=s["top1"], train_top1=s.get("train_top1"),
                         wall_s=s.get("wall_time_s"), command=" ".join(cmd[1:])))
    return {"split": counts, "pretrain_commands": {k: (" ".join(c[1:]) if c else None) for k, (p, c) in pretrain.items()},
            "runs": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=sorted(A.ARMS))
    ap.add_argument("--blr", type=float, nargs="+", default=GRID)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    ap.add_argument("--pretrain_seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    cells = {f"blr{blr:g}": ["--blr", f"{blr:g}"] for blr in args.blr}
    grid = run_grid(out, args.arms, cells, args.seeds, args.pretrain_seed, args.jobs)
    rows = grid["runs"]
    for r in rows:
        r["blr"] = float(r["cell"][len("blr"):])
    from report import environment

    result = {"env": environment(), "command": " ".join(["python", "benchmarks/quality/texture_ft_lr.py", *sys.argv[1:]]),
              "split": grid["split"], "val_seed": VAL_SEED, "val_tile_fraction": VAL_TILE_FRACTION,
              "pretrain_seed": args.pretrain_seed, "pretrain_commands": grid["pretrain_commands"], "runs": rows}
    with open(os.path.join(out, "texture_ft_lr.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot_grid(rows, args.arms, args.blr, os.path.join(out, "texture_ft_lr.png"))
    print(f"{'arm':20s} " + " ".join(f"{b:>8g}" for b in args.blr))
    for name in args.arms:
        cells = []
        for blr in args.blr:
            v = val_top1(rows, name, blr)
            cells.append(f"{np.mean(v):8.3f}" if v else f"{'-':>8s}")
        print(f"{name:20s} " + " ".join(cells))
    return 0


def val_top1(rows: List[dict], arm: str, blr: float) -> List[float]:
    """The validation top-1 of every seed of one grid cell."""
    return [r["val_top1"] for r in rows if r["arm"] == arm and r["blr"] == blr]


def plot_grid(rows: List[dict], arm_names: List[str], blrs: List[float], path: str) -> None:
    """Validation top-1 against the base lr, one line per arm (the mean) with every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, name in enumerate(arm_names):
        color = f"C{i}"
        means = []
        for blr in blrs:
            v = val_top1(rows, name, blr)
            ax.scatter([blr] * len(v), v, color=color, s=14, alpha=0.6)
            means.append(np.mean(v) if v else np.nan)
        ax.plot(blrs, means, "-o", color=color, label=A.ARMS[name].label if name in A.ARMS else name)
    from fastebm.eval.recipes import BLR_FEW

    ax.axvline(BLR_FEW, color="0.6", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(blrs, [f"{b:g}" for b in blrs])
    ax.set_xlabel("fine-tuning base lr (--blr); dotted: the built-in")
    ax.set_ylabel("validation top-1 (100 labels)")
    ax.set_title("textures at 32 px: 100-label fine-tuning lr, seeds as dots")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
