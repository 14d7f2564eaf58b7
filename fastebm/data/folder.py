"""``--data DIR``: an ImageFolder-style tree read through PIL with torchvision-style augmentation.

Class sub-folders are optional (pretraining ignores labels): every image file under DIR,
recursively, is a sample; its label is the index of its first-level sub-folder, or -1 for files
directly in DIR. Hidden files and folders (names starting with ".") are skipped. Images are
decoded by :func:`fastebm.data.decode.decode_image` (re-exported here), which applies the EXIF
orientation and maps every pixel mode to 8-bit RGB. Unreadable or corrupt files are not fatal
here: ``load`` raises ``UnreadableImage`` and the loader substitutes another sample and counts
the file (fastebm/data/loader.py).

``exclude`` (training passes its ``--output_dir``) is a folder that is never read as data even
when it lies inside DIR: a run's own pictures (``restoration_grid.png``, ``loss_curve.png``) must not
become training samples of its next ``--resume``. The files skipped there are counted and named in
one warning.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .decode import decode_image
from .errors import DataError, UnreadableImage
from .sampling import AUGMENT_STREAM, generator_for, spread_order
from .transforms import crop_flip_resize

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderData", "UnreadableImage", "decode_image", "scan_image_files", "within"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved: symlinks, ``..``, relative paths)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def scan_image_files(root: str, exclude: Optional[str] = None) -> Tuple[List[str], List[int], List[str]]:
    """(paths, labels, class names) of every image under ``root``, in a stable sorted order.

    Files under ``exclude`` (a folder, e.g. the run's ``--output_dir`` inside ``root``) are left out.
    Raises DataError when ``root`` is missing, not a folder, is ``exclude`` itself, or holds no
    (non-excluded, non-hidden) image.
    """
    return _scan(root, exclude)[:3]


def _scan(root: str, exclude: Optional[str] = None) -> Tuple[List[str], List[int], List[str], int]:
    """:func:`scan_image_files` and the number of image files skipped under ``exclude``."""
    if not os.path.exists(root):
        raise DataError(f"--data: folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"--data: {root!r} is not a folder (give a directory of images)")
    if exclude is not None and os.path.realpath(exclude) == os.path.realpath(root):
        raise DataError(f"--data: --output_dir {exclude!r} is the data folder itself; give an --output_dir outside "
                        f"--data (a run's own pictures would become training data)")
    if exclude is not None and not within(exclude, root):
        exclude = None  # outside the data: nothing to skip
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")
                     and not (exclude is not None and within(d.path, exclude)))
    class_index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    seen_dirs = set()
    excluded = 0
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:  # a symlink cycle (or the same folder linked twice): scan it once
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images = [name for name in sorted(files)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
        if exclude is not None and within(folder, exclude):
            excluded += len(images)
            continue
        rel = os.path.relpath(folder, root)
        label = -1 if rel == "." else class_index.get(rel.split(os.sep)[0], -1)
        for name in images:
            paths.append(os.path.join(folder, name))
            labels.append(label)
    if not paths:
        if excluded:
            raise DataError(f"--data: folder {root!r} has image files only under --output_dir {exclude!r} "
                            f"({excluded} skipped: a run's own outputs are never read as data); "
                            f"give an --output_dir outside --data")
        hidden = _hidden_images(root)
        if hidden:
            where = ", ".join(f"{name} ({n})" for name, n in list(hidden.items())[:3]) + (", ..." if len(hidden) > 3 else "")
            raise DataError(f"--data: folder {root!r} has image files only under hidden names ({sum(hidden.values())} "
                            f"skipped: {where}): files and folders whose names start with '.' are skipped; "
                            f"rename or move them")
        raise DataError(f"--data: folder {root!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), recursively")
    return paths, labels, classes, excluded


def _hidden_images(root: str) -> Dict[str, int]:
    """Image files that :func:`scan_image_files` skipped for a hidden (dot) name on their path, counted
    per outermost hidden entry (``.ipynb_checkpoints/``, ``._photo.jpg``), in walk order."""
    counts: Dict[str, int] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        parts = [] if os.path.relpath(folder, root) == "." else os.path.relpath(folder, root).split(os.sep)
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            hidden = next((os.path.join(*parts[:i + 1]) + os.sep for i, p in enumerate(parts) if p.startswith(".")),
                          None)
            if hidden is None and name.startswith("."):
                hidden = os.path.join(*parts, name)
            if hidden is not None:
                counts[hidden] = counts.get(hidden, 0) + 1
    return counts


class ImageFolderData:
    """Random-resized-crop (scale 0.2-1) + flip samples of an image tree, as uint8 (3, S, S).

    ``exclude``: a folder never read as data (the run's ``--output_dir`` when it lies inside
    ``root``); the image files skipped there are counted in ``excluded`` and named in one warning.
    Raises DataError as :func:`scan_image_files`.
    """

    def __init__(self, root: str, img_size: int, seed: int, crop_scale=(0.2, 1.0), exclude: Optional[str] = None):
        self.root = root
        self.img_size = img_size
        self.seed = seed
        self.crop_scale = crop_scale
        self.paths, self.labels, self.classes, self.excluded = _scan(root, exclude)
        if self.excluded:
            warnings.warn(f"--data: skipped {self.excluded} image file(s) under --output_dir {exclude!r}, which lies "
                          f"inside {root!r}: a run's own pictures are never read as training data", stacklevel=2)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int, epoch: int, aug_index: Optional[int] = None) -> Tuple[torch.Tensor, int]:
        """uint8 (3, S, S) crop of file ``index`` and its label; raises UnreadableImage.

        The crop and flip are drawn from (seed, epoch, ``aug_index``), default ``index``: a
        substitute for an unreadable sample passes the sample's own index, so samples that share
        a substitute file still get different crops.
        """
        im = decode_image(self.paths[index])
        g = self.crop_generator(epoch, index if aug_index is None else aug_index)
        return crop_flip_resize(im, self.img_size, g, scale=self.crop_scale), self.labels[index]

    def crop_generator(self, epoch: int, aug_index: int) -> torch.Generator:
        """The generator of sample ``aug_index``'s crop and flip in ``epoch`` (also used by the DALI loader)."""
        return generator_for(self.seed, AUGMENT_STREAM, epoch, aug_index)

    def check_readable(self, warn_after: int = 1000) -> int:
        """Index of a readable file, probing the whole list evenly (``spread_order``); DataError if none.

        Stops at the first file that decodes, so a healthy folder costs one decode. Long damaged
        runs (e.g. a class folder of partial downloads sorted first) do not fool it; a folder with
        no readable file at all is decoded completely before failing, with a warning after
        ``warn_after`` failures so a long scan is not silent.
        """
        first_error = None
        for count, index in enumerate(spread_order(len(self.paths)), start=1):
            try:
                decode_image(self.paths[index])
                return index
            except UnreadableImage as exc:
                first_error = first_error or exc
            if count == warn_after:
                warnings.warn(f"--data: the first {count} files probed in {self.root!r} are unreadable "
                              f"(e.g. {first_error}); checking the other {len(self.paths) - count}", stacklevel=2)
        raise DataError(f"--data: no readable image in {self.root!r}: all {len(self.paths)} file(s) failed to decode, "
                        f"e.g. {first_error} (remove or re-download the damaged files)")
