"""fastebm-train on the built-in data with the validation digits taken out (a check on the validation split).

Every recipe choice of the study is made on valsplit.py's split of the TRAINING digits (1,000 train /
300 validation), but the pretrained arms were pretrained on all 1,300 training digits, the 300
validation digits among them (without labels). A pretrained backbone may therefore score higher on
the validation digits than on digits it never saw, and a random init cannot: the split would then
favour pretrained arms over random init, which is one reading of fastebm's 0.02 lead on the
validation split that the test digits did not confirm (docs/quality.md, round 6).

This runs the study's pretraining command unchanged except that each validation digit's slot in the
training set holds a digit drawn (with a fixed seed) from the 1,000 split-train digits instead, so
the data's length, the steps per epoch and the lr schedule are exactly the built-in data's; the
photo crops are untouched. Fine-tune the result on the split with recipe_pilot.py ``--fastebm``.

    python benchmarks/quality/pretrain_without_val.py --output_dir DIR --seed S [any fastebm-train flag]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from valsplit import split_indices  # noqa: E402

SUBSTITUTE_SEED = 7  # which split-train digit fills each validation digit's slot


def without_val_digits(digits: torch.Tensor, labels: torch.Tensor):
    """(digits, labels): ``digits`` (N, 3, S, S) with every validation digit of the split
    (valsplit.split_indices of ``labels``) replaced by a split-train digit (and its label)."""
    train, val = split_indices(labels.numpy())
    sub = torch.from_numpy(np.random.default_rng(SUBSTITUTE_SEED).choice(train, len(val)))
    val = torch.from_numpy(val)
    digits, labels = digits.clone(), labels.clone()
    digits[val], labels[val] = digits[sub], labels[sub]
    return digits, labels


def install() -> None:
    """Makes fastebm-train's built-in data the data without the validation digits."""
    import fastebm.train.build as build
    from fastebm.data.builtin import BuiltinDemoData

    class BuiltinWithoutValDigits(BuiltinDemoData):
        def __init__(self, img_size: int, seed: int):
            super().__init__(img_size, seed)
            self.train_digits, self.train_digit_labels = without_val_digits(self.train_digits, self.train_digit_labels)

    build.BuiltinDemoData = BuiltinWithoutValDigits


def main(argv=None) -> int:
    install()
    from fastebm.cli.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
