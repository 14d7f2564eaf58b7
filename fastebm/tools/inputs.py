"""What the tools read: image files, folders of images, and the built-in held-out sets.

An input spec is a file (any extension PIL decodes), a folder (every image file under it,
recursively, in sorted order, hidden entries skipped; the extensions of ``--data``), or
``builtin:NAME`` for a held-out set of the built-in demo data at the model's resolution:

* ``builtin:digits``: the 497 held-out scikit-learn digits (never trained on);
* ``builtin:photos``: the 128 fixed crops of the held-out photos (``chelsea``, ``flower.jpg``);
* ``builtin:noise``: 497 images of uniform noise (independent uint8 per pixel and channel);
* ``builtin:blurred_digits``: the held-out digits blurred by a Gaussian of sigma = size/16 px.

A folder scan skips the command's own output folder (``exclude``, the ``-o`` folder) when it lies
inside the folder: a second run must not restore or score the first run's pictures.

Images are decoded lazily (``ImageItem.load``); a file that does not decode raises
``fastebm.data.folder.UnreadableImage``, which the tools count, list and skip.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..data.folder import IMAGE_EXTENSIONS, decode_image, within
from ..data.transforms import pil_to_uint8
from .errors import ToolInputError

BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = ("digits", "photos", "noise", "blurred_digits")
NOISE_SEED = 777


@dataclass
class ImageItem:
    """One input image: ``name`` (its path, or ``builtin:SET[i]``) and ``load() -> uint8 (3, H, W)``."""

    name: str
    load: Callable[[], torch.Tensor]


@functools.lru_cache(maxsize=2)
def _demo_data(img_size: int):
    from ..data.builtin import BuiltinDemoData

    return BuiltinDemoData(img_size, seed=0)  # the held-out split does not depend on the seed


def builtin_set(name: str, img_size: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) images of the built-in held-out set ``name`` (see the module docstring)."""
    if name not in BUILTIN_SETS:
        raise ToolInputError(f"unknown built-in set {BUILTIN_PREFIX}{name}; choose one of "
                             + ", ".join(BUILTIN_PREFIX + s for s in BUILTIN_SETS))
    held = _demo_data(int(img_size)).held_out
    if name == "digits":
        return held.digits
    if name == "photos":
        if len(held.photos) == 0:
            raise ToolInputError("builtin:photos is empty: the held-out photos are missing from this "
                                 "scikit-learn / scikit-image installation")
        return held.photos
    if name == "noise":
        g = torch.Generator().manual_seed(NOISE_SEED)
        return torch.randint(0, 256, (len(held.digits), 3, img_size, img_size), generator=g, dtype=torch.uint8)
    from torchvision.transforms.functional import gaussian_blur

    sigma = img_size / 16.0
    kernel = 2 * int(3 * sigma + 0.5) + 1
    return gaussian_blur(held.digits, [kernel, kernel], [sigma, sigma])


def _scan_folder(root: str, exclude: Optional[str] = None, excluded: Optional[List[str]] = None) -> List[str]:
    """Image files under ``root`` (sorted, hidden entries skipped); those under ``exclude`` go to ``excluded``."""
    paths, seen = [], set()
    if exclude is not None and not within(exclude, root):
        exclude = None
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle: scan each folder once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found = [os.path.join(folder, f) for f in sorted(files)
                 if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if exclude is not None and within(folder, exclude):
            if excluded is not None:
                excluded += found
            continue
        paths += found
    return paths


def _file_item(path: str) -> ImageItem:
    return ImageItem(path, lambda: pil_to_uint8(decode_image(path)))


def collect_images(specs: Sequence[str], img_size: int, what: str = "IMAGES", exclude: Optional[str] = None,
                   excluded: Optional[List[str]] = None) -> List[ImageItem]:
    """Every image named by ``specs`` (files, folders, ``builtin:NAME``), in the order given.

    ``img_size`` is the side of the built-in sets (the model's resolution). ``exclude``: a folder
    (the command's ``-o``) whose files a folder scan skips; the skipped paths are appended to
    ``excluded`` when given (a file named explicitly is never skipped). Raises ToolInputError
    when a path does not exist, a folder holds no image files (or only under ``exclude``), or
    nothing at all is found.
    """
    if isinstance(specs, str):
        specs = [specs]
    items: List[ImageItem] = []
    for spec in specs:
        spec = os.fspath(spec)
        if spec.startswith(BUILTIN_PREFIX):
            name = spec[len(BUILTIN_PREFIX):]
            images = builtin_set(name, img_size)
            items += [ImageItem(f"{spec}[{i}]", functools.partial(images.__getitem__, i)) for i in range(len(images))]
        elif os.path.isdir(spec):
            skipped: List[str] = []
            paths = _scan_folder(spec, exclude, skipped)
            if excluded is not None:
                excluded += skipped
            if not paths and skipped:
                raise ToolInputError(f"{what}: the image files in folder {spec!r} all lie under the output folder "
                                     f"{exclude!r} ({len(skipped)} skipped: outputs are never read as input); "
                                     f"give an output folder (-o) outside {spec!r}")
            if not paths:
                raise ToolInputError(f"{what}: no images found in folder {spec!r} (looked for "
                                     f"{' '.join(IMAGE_EXTENSIONS)}, recursively)")
            items += [_file_item(p) for p in paths]
        elif os.path.isfile(spec):
            items.append(_file_item(spec))
        else:
            raise ToolInputError(f"{what}: {spec!r} does not exist (give image files, folders, or "
                                 f"{BUILTIN_PREFIX}{'|'.join(BUILTIN_SETS)})")
    if not items:
        raise ToolInputError(f"{what}: no images given")
    return items
