"""How the built-in fine-tuning recipe was chosen (docs/quality.md): fastebm-eval finetune on a
validation split of the TRAINING digits (valsplit.py: 1,000 train / 300 val), never the test digits.

Grid: head init (random = MAE's trunc_normal, probe = LP-FT) x optimiser steps x base lr, on
timm's random init (rounds 1-5 chose on it alone), EnergyViT's own init (`fastebm_init`) and a
fastebm backbone given with --fastebm, 100 and 1,000 labels. Round 6 searched lr and layer decay
for the three compared arms with one grid, all labels, in two stages:

    python benchmarks/quality/recipe_pilot.py --out DIR --arms random fastebm_init fastebm \
        --fastebm RUNS/pretrain/fastebm_sS/backbone.pth --labels 1000 --recipes round6 --seeds 0
    python benchmarks/quality/recipe_pilot.py ... --recipes round6_stage2 --seeds 0 1   # same flags otherwise
Round 7, seeds 0 and 1, the same three arms and flags: ``--labels 1000 --recipes round7_many`` (past round 6's
edge), ``--labels 1000 --recipes round7_sp`` (shrink-and-perturb, shrink_perturb.py) and ``--labels 100 --recipes
round7_few`` (the 100-label lr); then, to settle a tie on timm's init, ``--arms random --labels 1000 --recipes
probe_2000_crop10_dp0_clip1_lr16 probe_2000_crop10_dp0_clip1_lr32 --seeds 2 3``.
Round 8: ``--labels 100 --recipes round8_few --seeds 0 1`` (the 100-label lr past round 7's edge), and the fastebm arm
at round 7's recipe from backbones pretrained without the validation digits (``pretrain_without_val.py --output_dir
NOVAL/fastebm_sS --seed S --img_size 32 --epochs 2 --demo_eval false --threads 1 --save_every 0``, then ``--out PILOT_NOVAL --arms
fastebm --fastebm NOVAL/fastebm_sS/backbone.pth`` with ``--labels 1000 --recipes probe_2000_crop10_dp0_clip1_lr16`` and
``--labels 100 --recipes probe_1000_crop08_dp0_clip1_lr16``, seeds 0-3: a separate --out, since runs are kept by arm,
labels, recipe and seed) against the study's backbones (the same two commands, seeds 0-3); then the all-label command
on the study's 8-epoch and 1-epoch backbones (``--fastebm RUNS/pretrain/fastebm_8ep_sS/backbone.pth`` and ``fastebm_1ep``,
each with its own --out, seeds 0 1).
Every run is the built-in recipe made explicit (folder data would otherwise get MAE's ImageNet one).

    python benchmarks/quality/recipe_pilot.py --out DIR --fastebm S0/backbone.pth [--seeds 0] [--jobs 2]

Writes DIR/pilot.json (one row per run: val top-1, running train top-1, the probe's val top-1) and
prints a table. Runs already in DIR are kept.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from valsplit import builtin_recipe, write_split  # noqa: E402

RECIPES = {  # name: (head_init, optimiser steps, blr, random-resized-crop scale_min, drop_path[, other flags])
    "random_1000": ("random", 1000, 4e-3, 0.35, 0.1), "probe_1000": ("probe", 1000, 4e-3, 0.35, 0.1),
    "random_300": ("random", 300, 4e-3, 0.35, 0.1), "probe_300": ("probe", 300, 4e-3, 0.35, 0.1),
    "probe_300_lowlr": ("probe", 300, 1e-3, 0.35, 0.1),
    # round 2: the crop's strength (at scale 0.35 the probe's accuracy on augmented training digits is
    # 0.39 against 0.85 on clean ones: fine-tuning starts far from the probe it was given)
    "probe_1000_crop08": ("probe", 1000, 4e-3, 0.8, 0.1), "probe_1000_crop10": ("probe", 1000, 4e-3, 1.0, 0.1),
    "random_1000_crop08": ("random", 1000, 4e-3, 0.8, 0.1),
    # round 3: stochastic depth. In train mode, drop_path 0.1 alone takes the LP-FT head's loss on the clean
    # training digits from 0.20 to 14.1 on a fastebm backbone (0.57 to 1.49 on timm's init): dropping the
    # last block's branch, which cancels most of the residual stream, changes the pooled features entirely
    "probe_1000_crop08_dp0": ("probe", 1000, 4e-3, 0.8, 0.0), "probe_1000_crop10_dp0": ("probe", 1000, 4e-3, 1.0, 0.0),
    "probe_1000_crop08_dp0_lr2": ("probe", 1000, 2e-3, 0.8, 0.0),
    # round 4: all labels, where fine-tuning ties the linear probe. Every fine-tuning of the study spikes in
    # warm-up (timm's init: train loss 1.5 -> 4.2 in epoch 2; fastebm: 2.2 -> 7.2) and the random-init
    # classifier ends at train top-1 0.93, still fitting: gradient clipping, a lower lr, a longer budget
    "probe_1000_crop10_dp0_clip1": ("probe", 1000, 4e-3, 1.0, 0.0, dict(clip_grad=1.0)),
    "probe_1000_crop10_dp0_lr2": ("probe", 1000, 2e-3, 1.0, 0.0),
    "probe_2000_crop10_dp0": ("probe", 2000, 4e-3, 1.0, 0.0),
    "probe_2000_crop10_dp0_clip1": ("probe", 2000, 4e-3, 1.0, 0.0, dict(clip_grad=1.0)),
    "probe_1000_crop08_dp0_clip1": ("probe", 1000, 4e-3, 0.8, 0.0, dict(clip_grad=1.0)),
    # round 5 (information, chose nothing): does a quarter of the lr keep a fastebm backbone's features
    # through the warm-up spike (train loss 1.2 -> 5-6 on fastebm backbones, -> 2-3 on random init)?
    "probe_2000_crop10_dp0_clip1_lr1": ("probe", 2000, 1e-3, 1.0, 0.0, dict(clip_grad=1.0)),
    # round 6: a search per arm, the same grid for every arm (timm's init, EnergyViT's init, fastebm). The recipe
    # above was chosen on timm's random init alone, which could favour random init: each arm now gets the best
    # of half / twice the lr and stronger / weaker layer decay around it, on the validation split
    "probe_2000_crop10_dp0_clip1_lr2": ("probe", 2000, 2e-3, 1.0, 0.0, dict(clip_grad=1.0)),
    "probe_2000_crop10_dp0_clip1_lr8": ("probe", 2000, 8e-3, 1.0, 0.0, dict(clip_grad=1.0)),
    "probe_2000_crop10_dp0_clip1_ld65": ("probe", 2000, 4e-3, 1.0, 0.0, dict(clip_grad=1.0, layer_decay=0.65)),
    "probe_2000_crop10_dp0_clip1_ld90": ("probe", 2000, 4e-3, 1.0, 0.0, dict(clip_grad=1.0, layer_decay=0.9)),
    # round 6, stage 2: on seed 0 half the lr and layer decay 0.65 lost to the built-in recipe on every arm, and
    # every arm's best was at the grid's edge (twice the lr, decay 0.9): one step further on both axes
    "probe_2000_crop10_dp0_clip1_lr16": ("probe", 2000, 16e-3, 1.0, 0.0, dict(clip_grad=1.0)),
    "probe_2000_crop10_dp0_clip1_ld100": ("probe", 2000, 4e-3, 1.0, 0.0, dict(clip_grad=1.0, layer_decay=1.0)),
    # round 7, all labels: round 6's winner (16e-3, built in by round 6) sat at the grid's edge: one more lr step, and
    # layer decay 0.9 (round 6's second best) at the new lr
    "probe_2000_crop10_dp0_clip1_lr32": ("probe", 2000, 32e-3, 1.0, 0.0, dict(clip_grad=1.0)),
    "probe_2000_crop10_dp0_clip1_lr16_ld90": ("probe", 2000, 16e-3, 1.0, 0.0, dict(clip_grad=1.0, layer_decay=0.9)),
    # round 7, 100 labels: the same per-arm search (the 100-label recipe was chosen on timm's init alone)
    "probe_1000_crop08_dp0_clip1_lr8": ("probe", 1000, 8e-3, 0.8, 0.0, dict(clip_grad=1.0)),
    "probe_1000_crop08_dp0_clip1_lr16": ("probe", 1000, 16e-3, 0.8, 0.0, dict(clip_grad=1.0)),
    # round 7, all labels, the built-in recipe from a shrunk-and-perturbed start (shrink_perturb.py; Ash and Adams
    # 2020): every arm's starting weights become shrink * theta + perturb * (a fresh timm init). If a pretrained
    # start fine-tunes worse than a fresh one (warm-starting), this should help the fastebm arm more than the others
    "probe_2000_crop10_dp0_clip1_lr16_sp50": ("probe", 2000, 16e-3, 1.0, 0.0, dict(clip_grad=1.0, shrink_perturb=(0.5, 0.1))),
    # round 8, 100 labels: round 7's winner (16e-3, built in by round 7) sat at the grid's edge: one more lr step
    "probe_1000_crop08_dp0_clip1_lr32": ("probe", 1000, 32e-3, 0.8, 0.0, dict(clip_grad=1.0)),
    "probe_1000_crop08_dp0_clip1_lr64": ("probe", 1000, 64e-3, 0.8, 0.0, dict(clip_grad=1.0)),
    # round 13, at 16 px: past the edges the round-13 grids' winners sat at (timm's init with 100 labels; every arm
    # with all labels)
    "probe_1000_crop08_dp0_clip1_lr128": ("probe", 1000, 128e-3, 0.8, 0.0, dict(clip_grad=1.0)),
    "probe_2000_crop10_dp0_clip1_lr64": ("probe", 2000, 64e-3, 1.0, 0.0, dict(clip_grad=1.0)),
}
# stage 1 (seed 0) and stage 2 (seeds 0 and 1; each arm's choice: the best mean validation top-1 of the two seeds)
ROUND6 = ["probe_2000_crop10_dp0_clip1", "probe_2000_crop10_dp0_clip1_lr2", "probe_2000_crop10_dp0_clip1_lr8",
          "probe_2000_crop10_dp0_clip1_ld65", "probe_2000_crop10_dp0_clip1_ld90"]
ROUND6_STAGE2 = ["probe_2000_crop10_dp0_clip1", "probe_2000_crop10_dp0_clip1_lr8", "probe_2000_crop10_dp0_clip1_ld90",
                 "probe_2000_crop10_dp0_clip1_lr16", "probe_2000_crop10_dp0_clip1_ld100"]
# round 7 (seeds 0 and 1 from the start): all labels, past round 6's edge; 100 labels, the round-6 grid's upward steps
ROUND7_MANY = ["probe_2000_crop10_dp0_clip1_lr16", "probe_2000_crop10_dp0_clip1_lr32", "probe_2000_crop10_dp0_clip1_lr16_ld90"]
ROUND7_FEW = ["probe_1000_crop08_dp0_clip1", "probe_1000_crop08_dp0_clip1_lr8", "probe_1000_crop08_dp0_clip1_lr16"]
ROUND7_SP = ["probe_2000_crop10_dp0_clip1_lr16", "probe_2000_crop10_dp0_clip1_lr16_sp50"]
ROUND8_FEW = ["probe_1000_crop08_dp0_clip1_lr16", "probe_1000_crop08_dp0_clip1_lr32", "probe_1000_crop08_dp0_clip1_lr64"]
# round 13, at 16 px: each label set's built-in recipe and its half and twice the lr (every arm, seeds 0 and 1)
ROUND13_FEW = ["probe_1000_crop08_dp0_clip1_lr16", "probe_1000_crop08_dp0_clip1_lr32", "probe_1000_crop08_dp0_clip1_lr64"]
ROUND13_MANY = ["probe_2000_crop10_dp0_clip1_lr8", "probe_2000_crop10_dp0_clip1_lr16", "probe_2000_crop10_dp0_clip1_lr32"]
ROUND13_FEW_EDGE = ["probe_1000_crop08_dp0_clip1_lr128"]
ROUND13_MANY_EDGE = ["probe_2000_crop10_dp0_clip1_lr64"]
GRIDS = {"round6": ROUND6, "round6_stage2": ROUND6_STAGE2, "round7_many": ROUND7_MANY, "round7_few": ROUND7_FEW,
         "round7_sp": ROUND7_SP, "round8_few": ROUND8_FEW, "round13_few": ROUND13_FEW, "round13_many": ROUND13_MANY,
         "round13_few_edge": ROUND13_FEW_EDGE, "round13_many_edge": ROUND13_MANY_EDGE}
# arm name in this pilot -> what fastebm-eval starts from ("fastebm": the backbone given with --fastebm)
INITS = {"random": ["--init", "random"], "fastebm_init": ["--init", "fastebm"]}
# Rounds 1-8 ran at 32 px (every arm built and evaluated at 32 px), the default here; round 13 searched the
# fine-tuning lr again at 16 px, the size the study evaluates at since round 12 (--img_size 16).
PILOT_PX = 32


def command(split: str, arm: str, labels: int, recipe: str, seed: int, out: str, img_size: int = PILOT_PX) -> list:
    head_init, steps, blr, scale_min, drop_path, *other = RECIPES[recipe]
    n = 100 if labels == 100 else 1000
    epochs = math.ceil(steps / (n // 32))
    flags = dict(builtin_recipe("finetune"), head_init=head_init, blr=blr, epochs=epochs, scale_min=scale_min,
                 drop_path=drop_path, warmup_epochs=round(0.1 * epochs, 2), eval_every=max(1, epochs // 5))
    # rounds 1-3 ran without clipping, before the built-in recipe clipped at 1: 0 keeps them reproducible
    flags.update(dict(clip_grad=0.0), **(other[0] if other else {}))
    if flags.pop("shrink_perturb", None):  # the run starts from the file prep_command writes
        arm = start_file(out)
    cmd = [sys.executable, "-m", "fastebm.cli.eval", "finetune", "--data", split, "--num_workers", "0", "--seed", str(seed),
           "--save_ckpt", "false", "--output_dir", out]
    cmd += INITS[arm] if arm in INITS else ["--ckpt", arm]
    cmd += ["--img_size", str(img_size)]  # every arm at the pilot's size (a backbone's own size is only the default)
    if labels == 100:
        cmd += ["--few_shot", "10"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def start_file(out: str) -> str:
    return out + "_start.pth"


def prep_command(src: str, recipe: str, seed: int, out: str):
    """shrink_perturb.py's command writing the run's starting weights (None: the recipe starts from ``src``)."""
    other = RECIPES[recipe][5] if len(RECIPES[recipe]) > 5 else {}
    if "shrink_perturb" not in other:
        return None
    shrink, perturb = other["shrink_perturb"]
    return [sys.executable, os.path.join(HERE, "shrink_perturb.py"), "--src", src, "--seed", str(seed),
            "--shrink", str(shrink), "--perturb", str(perturb), "--out", start_file(out)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fastebm", default=None, help="backbone.pth of a fastebm run (_sS: S is replaced by the seed)")
    ap.add_argument("--arms", nargs="+", default=["random", "fastebm"], choices=["random", "fastebm_init", "fastebm"])
    ap.add_argument("--labels", type=int, nargs="+", default=[100, 1000], choices=[100, 1000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help="names in RECIPES, or one grid name (GRIDS)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--img_size", type=int, default=PILOT_PX, help=f"the split's and every run's size, px (default {PILOT_PX}, rounds 1-8)")
    args = ap.parse_args()
    if len(args.recipes) == 1 and args.recipes[0] in GRIDS:
        args.recipes = GRIDS[args.recipes[0]]
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        ap.error(f"unknown recipes {unknown}; choose from {sorted(RECIPES)} or a grid: {', '.join(GRIDS)}")
    split = os.path.join(args.out, "valsplit" if args.img_size == PILOT_PX else f"valsplit{args.img_size}")
    write_split(split, args.img_size)
    jobs = []
    if "fastebm" in args.arms and not args.fastebm:
        ap.error("--fastebm is required for the fastebm arm")
    for seed, arm, labels, recipe in itertools.product(args.seeds, args.arms, args.labels, args.recipes):
        name = f"{arm}_{labels}_{recipe}_s{seed}" + ("" if args.img_size == PILOT_PX else f"_{args.img_size}px")
        out = os.path.join(args.out, name)
        src = arm if arm in INITS else args.fastebm.replace("_sS", f"_s{seed}")
        prep = prep_command(src, recipe, seed, out)
        cmd = command(split, src, labels, recipe, seed, out, args.img_size)
        jobs.append((name, out, [prep, cmd] if prep else [cmd], dict(arm=arm, labels=labels, recipe=recipe, seed=seed)))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(job):
        name, out, cmds, meta = job
        if not os.path.exists(os.path.join(out, "summary.json")):
            with open(out + ".log", "w") as log:
                for cmd in cmds:  # [shrink_perturb.py,] fastebm-eval finetune: a failed step stops the run
                    rc = subprocess.run(["nice", "-n", "10", *cmd], env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                    if rc:
                        return f"FAILED {name} (exit {rc} in {os.path.basename(cmd[1]) if cmd[1] != '-m' else cmd[2]}; see {out}.log)"
        return f"done {name}"

    with ThreadPoolExecutor(args.jobs) as pool:
        for status in pool.map(run, jobs):
            print(status, flush=True)
    rows = []
    for name, out, cmds, meta in jobs:
        try:
            s = json.load(open(os.path.join(out, "summary.json")))
        except OSError:
            continue
        rows.append(dict(meta, img_size=args.img_size, val_top1=s["top1"], train_top1=s.get("train_top1"), probe_top1=(s.get("probe") or {}).get("top1"),
                         wall_s=s["wall_time_s"], command=" && ".join(" ".join(c[1:]) for c in cmds)))
    with open(os.path.join(args.out, "pilot.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    for r in rows:
        print(f"{r['arm']:8s} {r['labels']:5d} {r['recipe']:16s} s{r['seed']} val {r['val_top1']:.3f} train {r['train_top1']:.3f} "
              f"probe {r['probe_top1'] if r['probe_top1'] is None else round(r['probe_top1'], 3)} {r['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
