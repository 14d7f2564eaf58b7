"""Where LP-FT starts: the probe head's loss and top-1 on its own training digits, before any update.

LP-FT (``fastebm-eval finetune --head_init probe``) fits its head on the deterministic backbone
(eval mode, clean digits). Fine-tuning then computes its loss in train mode (stochastic depth) on
augmented digits (random-resized crops). This prints, for one backbone, the cross-entropy and
top-1 of that head on the 1,300 built-in training digits in the four combinations of
{eval, train mode} x {clean, augmented}, for drop path 0.1 (MAE's) and 0 and crop scales 0.8 and
1.0, so the distance between where the head was fitted and where fine-tuning starts is visible.

    python benchmarks/quality/lpft_start.py --init random            # timm's random init
    python benchmarks/quality/lpft_start.py --ckpt RUN/backbone.pth  # a fastebm backbone

Writes nothing; prints a Markdown table. About 1 CPU minute.
"""
from __future__ import annotations

import argparse
import itertools
import random

import torch
import torch.nn.functional as F


def load(args):
    from fastebm.eval.backbone import init_backbone, read_backbone

    return init_backbone(args.init, "vit_demo", None, args.seed) if args.ckpt is None else read_backbone(args.ckpt)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a fastebm backbone.pth (or any fastebm-eval --ckpt)")
    src.add_argument("--init", choices=["random", "fastebm"], help="an untrained backbone (timm's or EnergyViT's init)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from fastebm.eval.config import make_config
    from fastebm.eval.datasets import load_eval_data, make_transforms
    from fastebm.eval.probe import logistic_head
    from fastebm.eval.timm_vit import build_classifier

    bb = load(args)
    size = bb.eval_img_size  # what fastebm-eval fine-tunes at: the size the backbone was pretrained at
    data = load_eval_data(make_config("finetune", init="random", seed=args.seed), size)
    y = torch.tensor(data.train.labels)
    images = [data.train[i][0] for i in range(len(data.train))]  # PIL images (no transform on data.train)
    print("| drop path | crop scale_min | probe weight norm | eval, clean | eval, augmented | train mode, clean | train mode, augmented |")
    print("|---|---|---|---|---|---|---|")
    for drop_path, scale_min in itertools.product((0.1, 0.0), (0.8, 1.0)):
        cfg = make_config("finetune", init="random", seed=args.seed, scale_min=scale_min)
        clean_t, aug_t = (make_transforms(cfg, size, bb.mean, bb.std, training=t) for t in (False, True))
        torch.manual_seed(args.seed)
        random.seed(args.seed)  # timm's random-resized crop draws from Python's random module
        clean = torch.stack([clean_t(im) for im in images])
        aug = torch.stack([aug_t(im) for im in images])
        model = build_classifier(bb, data.num_classes, img_size=size, global_pool="avg", drop_path_rate=drop_path,
                                 head_init_std=2e-5, seed=args.seed).eval()
        feats = model.forward_head(model.forward_features(clean), pre_logits=True)
        w, b = logistic_head(feats, y, data.num_classes, args.seed)  # LP-FT's probe, as fastebm-eval fits it
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
        cells = []
        for mode, x in (("eval", clean), ("eval", aug), ("train", clean), ("train", aug)):
            model.train(mode == "train")
            torch.manual_seed(args.seed + 1)  # the same drop-path draws for every row
            logits = model(x)
            cells.append(f"{float(F.cross_entropy(logits, y)):.2f} / {float((logits.argmax(1) == y).float().mean()):.2f}")
        print(f"| {drop_path} | {scale_min} | {float(w.norm()):.0f} | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: cross-entropy / top-1 of the LP-FT head on the labelled training digits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
