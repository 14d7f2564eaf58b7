"""Per-sample augmentation driven by an explicit generator (never the global RNG)."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from PIL import Image

from .decode import to_rgb8


def random_resized_crop_box(width: int, height: int, g: torch.Generator, scale=(0.2, 1.0),
                            ratio=(3.0 / 4.0, 4.0 / 3.0)) -> Tuple[int, int, int, int]:
    """(left, top, w, h) like torchvision's RandomResizedCrop.get_params, but drawn from ``g``.

    Up to ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, a centre crop clamped to the ratio range (torchvision's fallback).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# Kept under its old name: every mode -> 8-bit RGB without clipping wide data (see decode.py).
to_rgb = to_rgb8


def crop_flip_resize(im: Image.Image, size: int, g: torch.Generator, scale=(0.2, 1.0)) -> torch.Tensor:
    """Random-resized crop to ``size`` x ``size`` plus a horizontal flip with probability 1/2 -> uint8 (3,S,S)."""
    left, top, w, h = random_resized_crop_box(im.width, im.height, g, scale=scale)
    flip = bool(torch.rand(1, generator=g).item() < 0.5)
    out = im.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_uint8(out)


def pil_to_uint8(im: Image.Image) -> torch.Tensor:
    """Any PIL image -> uint8 (3, H, W), via :func:`fastebm.data.decode.to_rgb8`."""
    arr = np.asarray(to_rgb8(im), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
