"""The pretraining base learning rate of the MAE baseline (mae.MAE_BLR), searched on the TRAINING digits.

For each base lr of the grid, mae.py pretrains seed 0 (``--seed``) for the epochs that buy fastebm's training
FLOPs (the budget of the stretch comparison), then fastebm-eval linprobe (its built-in recipe made
explicit) is fitted on valsplit.py's 1,000 training digits and scored on its 300 validation
digits; the base lr with the best validation top-1 is MAE_BLR. The 497 test digits are not used.
``--method fastebm`` runs the same search for fastebm-train's ``--blr`` (the study's budget), so
both methods' learning rates can be judged the same way. The budget is the study's (arms.PRETRAIN_EPOCHS of
fastebm-train's defaults: since round 11, 8 epochs at 16 px). ``--img_size`` is MAE's pretraining size and
the split's (default arms.MAE_PX, the default study's MAE arms; fastebm pretrains at its defaults' size,
which must equal it). benchmarks/results/quality/mae_lr.json and fastebm_lr.json were measured at the
earlier 2 epochs at 32 px (MAE: 22.5 epochs); mae_lr_16px.json at today's budget at 16 px.

    python benchmarks/quality/mae_lr.py --out DIR [--blr 0.003 0.006 0.012 0.024 0.048] [--jobs 2] [--method fastebm] [--img_size 16]

Writes DIR/mae_lr.json (DIR/fastebm_lr.json; every grid point: val top-1, final loss, the commands).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from valsplit import builtin_recipe, write_split  # noqa: E402


def main() -> int:
    import flops
    from arms import MAE_PX, PRETRAIN_EPOCHS, TRAIN_COMMON
    from fastebm.models import pretrain_img_size

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--blr", type=float, nargs="+", default=[0.006, 0.012, 0.024, 0.048])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--method", choices=["mae", "fastebm"], default="mae")
    ap.add_argument("--seed", type=int, default=0, help="the pretraining seed (default 0; the split is always the same)")
    ap.add_argument("--img_size", type=int, default=MAE_PX, help=f"MAE's pretraining size and the split's, px (default {MAE_PX})")
    args = ap.parse_args()
    if args.method == "fastebm" and args.img_size != pretrain_img_size("vit_demo"):
        ap.error(f"--method fastebm pretrains at fastebm-train's default {pretrain_img_size('vit_demo')} px: "
                 f"give --img_size {pretrain_img_size('vit_demo')}")
    split = os.path.join(args.out, f"valsplit{args.img_size}")
    counts = write_split(split, args.img_size)
    epochs = PRETRAIN_EPOCHS * flops.fastebm_step_flops([]) / flops.mae_step_flops(img_size=args.img_size)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    probe = builtin_recipe("linprobe")
    probe_epochs = math.ceil(1800 / (counts["train"] // probe["batch_size"]))
    seed_suffix = f"_s{args.seed}" if args.seed else ""  # seed 0 keeps the names of the runs before --seed

    def one(blr):
        pdir = os.path.join(args.out, f"{args.method}_{args.img_size}px_blr{blr:g}{seed_suffix}")
        if args.method == "mae":
            pre = [sys.executable, os.path.join(HERE, "mae.py"), "--output_dir", pdir, "--seed", str(args.seed), "--epochs", f"{epochs:.4f}",
                   "--blr", str(blr), "--img_size", str(args.img_size)]
        else:
            pre = [sys.executable, "-m", "fastebm", "train", "--output_dir", pdir, "--seed", str(args.seed), *TRAIN_COMMON, "--blr", str(blr)]
        lp = [sys.executable, "-m", "fastebm", "eval", "linprobe", "--ckpt", os.path.join(pdir, "backbone.pth"), "--data", split,
              "--num_workers", "0", "--epochs", str(probe_epochs), "--warmup_epochs", str(round(probe_epochs / 9, 2)),
              "--output_dir", pdir + "_lp"] + [a for k, v in probe.items() for a in (f"--{k}", str(v))]
        for cmd, done, log in ((pre, os.path.join(pdir, "summary.json"), pdir + ".log"),
                               (lp, os.path.join(pdir + "_lp", "summary.json"), pdir + "_lp.log")):
            if not os.path.exists(done):
                with open(log, "w") as fh:
                    subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)
        pre_s = json.load(open(os.path.join(pdir, "summary.json")))
        lp_s = json.load(open(os.path.join(pdir + "_lp", "summary.json")))
        return {"blr": blr, "val_top1": lp_s["top1"], "final_loss": pre_s.get("final_loss"), "steps": pre_s.get("steps", pre_s.get("step")),
                "commands": [" ".join(pre[1:]), " ".join(lp[1:])]}

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, args.blr))
    best = max(rows, key=lambda r: r["val_top1"])
    result = {"method": args.method, "seed": args.seed, "epochs": epochs if args.method == "mae" else PRETRAIN_EPOCHS, "img_size": args.img_size,
              "split": counts, "command": " ".join(["python", "benchmarks/quality/mae_lr.py", *sys.argv[1:]]),
              "rows": rows, "best_blr": best["blr"]}
    with open(os.path.join(args.out, f"{args.method}_lr{seed_suffix}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    for r in rows:
        print(f"blr {r['blr']:g}: val top-1 {r['val_top1']:.3f}, final loss {r['final_loss']}")
    print(f"best blr {best['blr']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
