"""Shrink-and-perturb a starting point before fine-tuning (Ash and Adams 2020, "On Warm-Starting Neural
Network Training", NeurIPS, section 5): every backbone tensor becomes ``shrink * theta + perturb * theta_fresh``,
where ``theta_fresh`` is a new timm initialisation of the same architecture (the perturbation follows each
tensor's own init scale: LayerNorm gains get ``+perturb``, biases nothing).

A test of the "warm-starting" explanation of docs/quality.md (a pretrained starting point fine-tunes worse per
unit of frozen quality than a fresh one): if it holds, shrink-and-perturb should help a fastebm backbone more than
a random init. Applied to every arm alike, so it is a recipe, not a tuning of the benchmark to one arm.

    python benchmarks/quality/shrink_perturb.py --src random|fastebm_init|BACKBONE.pth --seed S \\
        --shrink 0.5 --perturb 0.1 --out FILE.pth

``--src random`` is exactly the weights ``fastebm-eval --init random --seed S`` starts from (timm's init,
seeded the same way), ``fastebm_init`` those of ``--init fastebm --seed S``. ``theta_fresh`` is timm's init at
seed ``S + 10_000``. Writes FILE.pth and its sidecar (fastebm-eval reads it with ``--ckpt FILE.pth``).
"""
from __future__ import annotations

import argparse
import os
import sys

FRESH_SEED_OFFSET = 10_000


def timm_init_state(bb, seed: int):
    """Backbone tensors of timm's seeded init (``fastebm-eval --init random --seed seed``) of ``bb``'s architecture,
    without the head; ``bb``'s own weights are not used."""
    from dataclasses import replace

    from fastebm.eval.timm_vit import build_classifier

    model = build_classifier(replace(bb, state=None), 10, img_size=None, global_pool="avg", drop_path_rate=0.0, head_init_std=2e-5, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def shrink_perturb(state, fresh, shrink: float, perturb: float):
    """``shrink * state + perturb * fresh`` per tensor, computed in float64, stored in ``state``'s dtype.

    Raises ValueError when the two do not hold the same tensor names and shapes."""
    if set(state) != set(fresh):
        raise ValueError(f"tensor names differ: {sorted(set(state) ^ set(fresh))[:4]}")
    out = {}
    for k, v in state.items():
        if v.shape != fresh[k].shape:
            raise ValueError(f"{k}: {tuple(v.shape)} vs fresh {tuple(fresh[k].shape)}")
        out[k] = (shrink * v.double() + perturb * fresh[k].double()).to(v.dtype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="random, fastebm_init, or a backbone file fastebm-eval --ckpt reads")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--shrink", type=float, required=True, help="lambda, in (0, 1]")
    ap.add_argument("--perturb", type=float, required=True, help="sigma, >= 0 (scale of the fresh init added)")
    ap.add_argument("--out", required=True, help="FILE.pth")
    args = ap.parse_args(argv)
    if not 0 < args.shrink <= 1 or args.perturb < 0:
        ap.error("--shrink must be in (0, 1] and --perturb >= 0")
    if not args.out.endswith(".pth"):
        ap.error("--out must end with .pth")
    from fastebm.eval.backbone import init_backbone, read_backbone
    from fastebm.eval.export import write_export

    if args.src in ("random", "fastebm_init"):
        # 32 px: the size round 7 measured at (an untrained vit_demo is otherwise built at 16 px since round 12)
        bb = init_backbone("random" if args.src == "random" else "fastebm", "vit_demo", 32, args.seed)
    else:
        bb = read_backbone(args.src)
    if bb.state is None:
        bb.state = timm_init_state(bb, args.seed)
    fresh = timm_init_state(bb, args.seed + FRESH_SEED_OFFSET)
    bb.state = shrink_perturb(bb.state, fresh, args.shrink, args.perturb)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_export(bb, args.out, {"shrink_perturb": {"src": args.src, "seed": args.seed, "shrink": args.shrink,
                                                   "perturb": args.perturb}})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
