"""Shared fixtures of the fastebm-eval / fastebm-export tests (no tests here).

``trained_checkpoint()`` runs the real ``fastebm-train`` once per session (vit_demo at 16 px,
one optimiser step) so the evaluation tests read a genuine ``last.pt`` (fastebm-eval evaluates it at
the 16 px it was pretrained at, unless a test gives ``img_size``); ``image_folder()``
writes a tiny ImageNet-style tree of PNGs whose classes differ in colour.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

_CACHE = {}


def trained_checkpoint() -> str:
    """Path of a real fastebm training checkpoint (vit_demo, 16 px, 1 step); built once per session."""
    if "ckpt" not in _CACHE:
        from fastebm.cli.train import main as train_main

        out = tempfile.mkdtemp(prefix="fastebm-eval-test-")
        code = train_main(["--img_size", "16", "--max_steps", "1", "--demo_eval", "false", "--batch_size", "8",
                           "--grid_every", "0", "--save_every", "0", "--output_dir", out])
        assert code == 0
        _CACHE["ckpt"] = os.path.join(out, "last.pt")
    return _CACHE["ckpt"]


def image_folder(root, classes=("ant", "bee", "cat"), per_class=(6, 5, 4), val_classes=None, val_per_class=3,
                 size=20, seed=0) -> str:
    """root/train/<class>/*.png and root/val/<class>/*.png; class c is tinted towards colour c."""
    rng = np.random.default_rng(seed)
    tints = rng.uniform(0, 255, size=(len(classes) + 8, 3))

    def write(split, names, counts):
        for c, (name, n) in enumerate(zip(names, counts)):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                arr = np.clip(0.6 * tints[c] + 0.4 * rng.uniform(0, 255, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(root, split, name, f"{i}.png"))

    write("train", classes, per_class)
    vc = tuple(val_classes or classes)
    write("val", vc, [val_per_class] * len(vc))
    return str(root)
