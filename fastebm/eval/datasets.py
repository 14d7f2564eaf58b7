"""Labelled data for downstream evaluation: built-in digits or ImageNet-style class folders.

* No data argument: scikit-learn's digits with the demo's fixed split (1,300 training and 497
  held-out digits, :mod:`fastebm.data.builtin`), upsampled to the model's input size, grey to RGB.
* ``--data DIR``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (the MAE/ImageNet layout);
  or ``--train_dir``/``--val_dir``. Train and val must have the same class folders.
* ``--few_shot K``: K training images per class, drawn with ``--seed`` (label-efficiency runs).

Images go through timm's ``create_transform`` (training: random-resized crop, flip, RandAugment,
random erasing per the recipe; evaluation: resize + centre crop), and come out normalised
float tensors (3, S, S) with an integer label. A training set given an ``augment_seed`` draws each
image's augmentation from global RNGs seeded with (seed, epoch, index) for that one call and restored
after it (timm's transforms read Python's, NumPy's and torch's global RNGs): the images a fine-tuning
run trains on are the same with any number of loader workers or processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.builtin import HELD_OUT_DIGITS, SPLIT_SEED, digits_uint8
from ..data.folder import IMAGE_EXTENSIONS, decode_image
from ..data.sampling import AUGMENT_STREAM, generator_for, mix_seed, seeded_global_rngs
from ..errors import UsageError

FEW_SHOT_STREAM = 11  # seeds the few-shot draw, independent of the data order and augmentation


class LabelledImages(Dataset):
    """(image, label) pairs; ``load(i)`` gives a PIL RGB image, ``transform`` makes the tensor.

    ``augment_seed``: None, or the seed of per-image augmentation draws: item ``i`` in the epoch set by
    :meth:`set_epoch` is transformed with the global RNGs seeded from (augment_seed, epoch, i) and restored
    afterwards, so an image's augmentation depends on nothing else (not the loader worker that draws it).
    """

    def __init__(self, load: Callable[[int], Image.Image], labels: Sequence[int], transform=None, describe=None,
                 augment_seed: Optional[int] = None):
        self._load = load
        self.labels = [int(v) for v in labels]
        self.transform = transform
        self.describe = describe or (lambda i: f"image {i}")
        self.augment_seed = augment_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation draws ``__getitem__`` makes (read by loader workers started after it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self._load(index)
        if self.transform is None:
            return image, self.labels[index]
        if self.augment_seed is None:
            return self.transform(image), self.labels[index]
        with seeded_global_rngs(mix_seed(self.augment_seed, AUGMENT_STREAM, self.epoch, index)):
            return self.transform(image), self.labels[index]

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        idx = [int(i) for i in indices]
        return LabelledImages(lambda i: self._load(idx[i]), [self.labels[i] for i in idx], self.transform,
                              lambda i: self.describe(idx[i]), self.augment_seed)


@dataclass
class EvalData:
    train: LabelledImages
    val: LabelledImages
    classes: List[str]
    kind: str  # "builtin" or "folder"
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def builtin_digit_split(img_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels): the demo's split, uint8 (N, 3, S, S)."""
    digits, labels = digits_uint8(img_size)
    perm = torch.randperm(len(digits), generator=generator_for(SPLIT_SEED))
    held, train = perm[:HELD_OUT_DIGITS], perm[HELD_OUT_DIGITS:]
    return digits[train], labels[train], digits[held], labels[held]


def _tensor_images(images: torch.Tensor, labels: torch.Tensor) -> LabelledImages:
    arrays = images.permute(0, 2, 3, 1).contiguous().numpy()
    return LabelledImages(lambda i: Image.fromarray(arrays[i], "RGB"), labels.tolist())


def scan_class_folders(root: str, flag: str) -> Tuple[List[str], List[int], List[str]]:
    """(paths, labels, classes) of ``root/<class>/**/image``; UsageError when it is not such a tree."""
    if not os.path.isdir(root):
        raise UsageError(f"{flag}: folder {root!r} does not exist")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UsageError(f"{flag}: {root!r} has no class sub-folders; put each class's images in {root}/<class>/")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(folder, f) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not found:
            raise UsageError(f"{flag}: class folder {os.path.join(root, name)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def _folder_images(root: str, flag: str) -> Tuple[LabelledImages, List[str]]:
    paths, labels, classes = scan_class_folders(root, flag)

    def load(i: int) -> Image.Image:
        try:
            return decode_image(paths[i])
        except Exception as exc:  # UnreadableImage: name the file, the run cannot score it
            raise UsageError(f"unreadable image {paths[i]}: {getattr(exc, 'reason', exc)}; remove or replace it") from None

    return LabelledImages(load, labels, describe=lambda i: paths[i]), classes


def few_shot_indices(labels: Sequence[int], k: int, seed: int, classes: Sequence[str]) -> List[int]:
    """K indices per class, drawn without replacement from a generator seeded by (seed, stream); sorted."""
    labels_t = torch.as_tensor(list(labels))
    counts = torch.bincount(labels_t, minlength=len(classes))
    smallest = int(counts.argmin())
    if k > int(counts[smallest]):
        raise UsageError(f"--few_shot {k} exceeds the smallest training class {classes[smallest]!r} "
                         f"({int(counts[smallest])} images); use --few_shot <= {int(counts[smallest])}")
    g = generator_for(seed, FEW_SHOT_STREAM)
    keep = []
    for c in range(len(classes)):
        members = torch.nonzero(labels_t == c).flatten()
        keep += members[torch.randperm(len(members), generator=g)[:k]].tolist()
    return sorted(keep)


def load_eval_data(cfg, img_size: int) -> EvalData:
    """The labelled train/val data a config asks for (validated; no transform attached yet)."""
    if cfg.data is None and cfg.train_dir is None:
        x_tr, y_tr, x_va, y_va = builtin_digit_split(img_size)
        train, val = _tensor_images(x_tr, y_tr), _tensor_images(x_va, y_va)
        classes = [str(i) for i in range(10)]
        kind, what = "builtin", "built-in digits (demo split)"
    else:
        if cfg.data is not None:
            if not os.path.isdir(cfg.data):
                raise UsageError(f"--data: folder {cfg.data!r} does not exist")
            missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(cfg.data, s))]
            if missing:
                raise UsageError(f"--data {cfg.data}: no {' or '.join(m + '/' for m in missing)} folder; the layout is "
                                 f"DIR/train/<class>/... and DIR/val/<class>/... (or give --train_dir and --val_dir)")
            train_dir, val_dir = os.path.join(cfg.data, "train"), os.path.join(cfg.data, "val")
        else:
            train_dir, val_dir = cfg.train_dir, cfg.val_dir
        train, classes = _folder_images(train_dir, "--train_dir" if cfg.data is None else "--data train/")
        val, val_classes = _folder_images(val_dir, "--val_dir" if cfg.data is None else "--data val/")
        if classes != val_classes:
            only_t = sorted(set(classes) - set(val_classes))[:3]
            only_v = sorted(set(val_classes) - set(classes))[:3]
            raise UsageError(f"class folders differ between train ({train_dir}) and val ({val_dir}): "
                             f"only in train {only_t}, only in val {only_v}; both need the same class folders")
        kind, what = "folder", f"{train_dir} / {val_dir}"
    if cfg.few_shot is not None:
        train = train.subset(few_shot_indices(train.labels, cfg.few_shot, cfg.seed, classes))
        what += f", {cfg.few_shot} labelled images per class"
    return EvalData(train, val, classes, kind, what)


def make_transforms(cfg, img_size: int, mean, std, training: bool):
    """timm's ``create_transform`` with the recipe's settings (``training``: fine-tuning augmentation)."""
    from timm.data import create_transform

    common = dict(input_size=img_size, interpolation=cfg.interpolation, mean=tuple(mean), std=tuple(std))
    if not training:
        return create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
    aa = None if cfg.aa in (None, "off") else cfg.aa
    return create_transform(is_training=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip, auto_augment=aa,
                            color_jitter=None, re_prob=cfg.reprob, re_mode=cfg.remode,
                            re_count=cfg.recount, **common)


def with_transform(ds: LabelledImages, transform, augment_seed: Optional[int] = None) -> LabelledImages:
    """``ds``'s images and labels with another transform; ``augment_seed`` as in :class:`LabelledImages` (None:
    the transform reads the global RNGs as they are, right for a deterministic evaluation transform)."""
    return LabelledImages(ds._load, ds.labels, transform, ds.describe, augment_seed)


def class_counts(labels: Sequence[int], num_classes: int) -> List[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
