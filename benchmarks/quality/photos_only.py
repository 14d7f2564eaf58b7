"""Pretraining without the digits: the built-in data with every digit's slot holding a photo crop (round 15).

On the digits benchmark MAE at equal FLOPs leads fastebm's frozen features by far (k-NN 0.933 against
0.742); on the texture benchmark, photographs no arm was pretrained on, the two are close. The 1,300
training digits the digits benchmark labels are pretraining images too (without labels), so one
reading is that MAE's long run learns the pretraining distribution better, not better features in
general. This module takes the digits out of pretraining for any arm, so that the digits benchmark
measures transfer as the texture benchmark does.

``PhotosOnlyData`` keeps the built-in data's length (1,300 digit slots + 1,500 photo crops per epoch),
so the steps per epoch, the lr schedule and the training FLOPs are exactly the built-in data's; slot
``i`` of epoch ``e`` is a crop of training photo ``(i - 1300) mod 7`` drawn from the same seeded stream
(seed, epoch, i) as the built-in photo crops, so the crops of the photo slots are the built-in
data's and the digit slots get fresh ones. The held-out split (497 digits, two photos) is unchanged.

    python benchmarks/quality/photos_only.py --output_dir DIR --seed S [any fastebm-train flag]   # fastebm-train
    python benchmarks/quality/mae.py --pretrain_data photos ...                                   # the MAE baseline
"""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import torch

from fastebm.data.builtin import BuiltinDemoData, photo_crop
from fastebm.data.sampling import AUGMENT_STREAM, generator_for

PRETRAIN_DATA = ("builtin", "photos")  # what an arm pretrains on: the built-in data, or this module's


class PhotosOnlyData(BuiltinDemoData):
    """The built-in data (same length, held-out split, seeded crops) with photo crops in the digits' slots.

    ``load(i, e)`` returns a uint8 (3, S, S) crop of training photo ``(i - 1300) mod len(photos)`` and label -1
    for every ``i``. Raises ``RuntimeError`` when no training photo could be loaded.
    """

    def __init__(self, img_size: int, seed: int):
        super().__init__(img_size, seed)
        if not self.photos:
            raise RuntimeError("photos_only: none of the built-in training photos could be loaded")
        self.num_digit_slots = len(self.train_digits)

    def load(self, index: int, epoch: int) -> Tuple[torch.Tensor, int]:
        g = generator_for(self.seed, AUGMENT_STREAM, epoch, index)
        photo = self.photos[(index - self.num_digit_slots) % len(self.photos)]
        return photo_crop(photo, self.img_size, g), -1

    def summary(self) -> Dict[str, int]:
        out = super().summary()
        out.update(train_digits=0, photo_crops_per_epoch=len(self))
        return out


def data_class(pretrain_data: str):
    """The data class of ``pretrain_data`` (one of PRETRAIN_DATA); ValueError for another name."""
    if pretrain_data not in PRETRAIN_DATA:
        raise ValueError(f"pretrain data {pretrain_data!r}: choose one of {', '.join(PRETRAIN_DATA)}")
    return BuiltinDemoData if pretrain_data == "builtin" else PhotosOnlyData


def install() -> None:
    """Makes fastebm-train's built-in data (no ``--data``) the photos-only data."""
    import fastebm.train.build as build

    build.BuiltinDemoData = PhotosOnlyData


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--data" in argv or any(a.startswith("--data=") for a in argv):
        print("photos_only.py: error: --data replaces the built-in data this script changes; drop it", file=sys.stderr)
        return 2
    install()
    from fastebm.cli.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
