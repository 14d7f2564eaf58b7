"""A validation split carved from the built-in TRAINING digits, for choosing hyper-parameters.

The 497 held-out digits are the benchmark's test set and are never used to choose anything. Where
a choice has to be made (the fine-tuning recipe, the MAE baseline's learning rate), it is made on
this split: ``VAL_PER_CLASS`` digits of each class drawn from the 1,300 training digits with a
fixed seed go to ``val/``, the rest to ``train/``, as PNG files in the ImageNet layout that
``fastebm-eval --data DIR`` reads (``DIR/{train,val}/<class>/<n>.png``; lossless, so the pixels
are exactly the built-in ones).

    python benchmarks/quality/valsplit.py --out DIR [--img_size 32]
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Tuple

import numpy as np
import torch

VAL_PER_CLASS = 30
SPLIT_SEED = 12  # this split's own seed (the held-out split's is fastebm.data.builtin.SPLIT_SEED)
# The built-in recipe of each fastebm-eval command, made explicit: folder data would get MAE's ImageNet recipe.
# Settings the built-in data resolves from its size are not in it (fine-tuning: epochs, crop, blr): give them
# explicitly on the split folder, as recipe_pilot.py does, or they fall back to the folder recipe's.
def builtin_recipe(command: str) -> Dict:
    from fastebm.eval.recipes import RECIPES

    return dict(RECIPES["small"][command])


def split_indices(labels: np.ndarray, per_class: int = VAL_PER_CLASS, seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of the training digits: ``per_class`` of each class to val, sorted."""
    g = np.random.default_rng(seed)
    val = np.concatenate([g.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, np.sort(val)


def write_split(out: str, img_size: int = 32) -> Dict[str, int]:
    """Writes the split under ``out`` (once: an existing complete split is kept); returns the counts."""
    from PIL import Image

    from fastebm.eval.datasets import builtin_digit_split

    done = os.path.join(out, "DONE")
    x_tr, y_tr, _, _ = builtin_digit_split(img_size)
    labels = y_tr.numpy()
    train, val = split_indices(labels)
    if not os.path.exists(done):
        for part, idx in (("train", train), ("val", val)):
            for i in idx:
                folder = os.path.join(out, part, str(int(labels[i])))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(x_tr[i].permute(1, 2, 0).contiguous().numpy(), "RGB").save(os.path.join(folder, f"{i:04d}.png"))
        with open(done, "w") as fh:
            fh.write(f"{len(train)} train / {len(val)} val\n")
    return {"train": int(len(train)), "val": int(len(val))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--img_size", type=int, default=32)
    args = ap.parse_args()
    print(write_split(args.out, args.img_size))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
