"""Built-in demo data: images that ship inside installed packages (nothing is downloaded).

* scikit-learn's ``load_digits`` (1,797 labelled 8x8 digits), upsampled to the model's size and
  replicated to RGB;
* random crops of the colour photos bundled with scikit-learn (``load_sample_images``) and
  scikit-image (``skimage.data``).

A fixed split, independent of ``--seed``, holds out 497 digits (with labels, for the linear
probe and the PSNR evaluation) and two whole photos (``chelsea`` and sklearn's ``flower.jpg``),
whose crops are never trained on.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .sampling import AUGMENT_STREAM, generator_for
from .transforms import pil_to_uint8

SPLIT_SEED = 20230206  # fixes the held-out split for every run
HELD_OUT_DIGITS = 497
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "sklearn:china.jpg")
HELD_OUT_PHOTOS = ("chelsea", "sklearn:flower.jpg")
PHOTO_CROPS_PER_EPOCH = 1500  # virtual samples drawn from the training photos each epoch
EVAL_PHOTO_CROPS = 128


def _load_photo(name: str) -> np.ndarray:
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        files = [f.replace("\\", "/").rsplit("/", 1)[-1] for f in data.filenames]
        return data.images[files.index(name.split(":", 1)[1])]
    import skimage.data

    return getattr(skimage.data, name)()


def _load_photos(names) -> List[Image.Image]:
    photos = []
    for name in names:
        try:
            arr = _load_photo(name)
        except Exception as exc:  # a packaging variant without this file: use the others
            warnings.warn(f"built-in photo {name!r} unavailable ({exc}); continuing without it", stacklevel=2)
            continue
        photos.append(Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8)).convert("RGB"))
    return photos


def digits_uint8(img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 (N, 3, S, S) (bilinear upsampling) and their labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(d.target).long()


def photo_crop(photo: Image.Image, img_size: int, g: torch.Generator) -> torch.Tensor:
    """A square crop of side 24..192 px (log-uniform) resized to ``img_size``, flipped with p=1/2."""
    u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    side = int(round(np.exp(np.log(24) + (np.log(192) - np.log(24)) * u[0])))
    side = min(side, photo.width, photo.height)
    left = int(u[1] * (photo.width - side + 1))
    top = int(u[2] * (photo.height - side + 1))
    out = photo.resize((img_size, img_size), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=2.0)
    if u[3] < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_uint8(out)


@dataclass
class HeldOut:
    """Evaluation images never trained on."""

    digits: torch.Tensor  # uint8 (N, 3, S, S)
    digit_labels: torch.Tensor  # (N,)
    photos: torch.Tensor  # uint8 (M, 3, S, S), fixed crops of the held-out photos

    def restoration_images(self, per_source: int = 64) -> torch.Tensor:
        """A fixed mix of held-out digits and photo crops for the PSNR evaluation."""
        return torch.cat([self.digits[:per_source], self.photos[:per_source]])


class BuiltinDemoData:
    """Training samples: the training digits followed by ``PHOTO_CROPS_PER_EPOCH`` virtual photo crops.

    Sample ``i`` of epoch ``e`` is a pure function of (seed, e, i). Also exposes the held-out
    split (``held_out``) and the training digits with labels (``train_digits``) for the probe.
    """

    def __init__(self, img_size: int, seed: int):
        self.img_size = img_size
        self.seed = seed
        digits, labels = digits_uint8(img_size)
        perm = torch.randperm(len(digits), generator=generator_for(SPLIT_SEED))
        held, train = perm[:HELD_OUT_DIGITS], perm[HELD_OUT_DIGITS:]
        self.train_digits, self.train_digit_labels = digits[train], labels[train]
        self.photos = _load_photos(TRAIN_PHOTOS)
        held_photos = _load_photos(HELD_OUT_PHOTOS)
        g = generator_for(SPLIT_SEED, 1)
        crops = [photo_crop(held_photos[i % len(held_photos)], img_size, g) for i in range(EVAL_PHOTO_CROPS)] if held_photos else []
        self.held_out = HeldOut(digits[held], labels[held],
                                torch.stack(crops) if crops else torch.empty(0, 3, img_size, img_size, dtype=torch.uint8))
        self.num_photo_crops = PHOTO_CROPS_PER_EPOCH if self.photos else 0

    def __len__(self) -> int:
        return len(self.train_digits) + self.num_photo_crops

    def describe(self, index: int) -> str:
        return f"builtin[{index}]"

    def load(self, index: int, epoch: int) -> Tuple[torch.Tensor, int]:
        n_digits = len(self.train_digits)
        if index < n_digits:
            return self.train_digits[index], int(self.train_digit_labels[index])
        g = generator_for(self.seed, AUGMENT_STREAM, epoch, index)
        photo = self.photos[(index - n_digits) % len(self.photos)]
        return photo_crop(photo, self.img_size, g), -1

    def summary(self) -> Dict[str, int]:
        return {"train_digits": len(self.train_digits), "photo_crops_per_epoch": self.num_photo_crops,
                "train_photos": len(self.photos), "held_out_digits": len(self.held_out.digits),
                "held_out_photo_crops": len(self.held_out.photos)}
