"""Shared helpers of the training tests (no tests here): tiny image folders and fast run settings."""
import json
import os

import numpy as np
from PIL import Image


def make_image_folder(root, n=12, seed=0, classes=("a", "b"), size=(22, 18)):
    """n random RGB images split over class sub-folders (plus one at the top level)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        sub = os.path.join(root, classes[i % len(classes)]) if i else root
        os.makedirs(sub, exist_ok=True)
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = os.path.join(sub, f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def fast_args(out, data, **over):
    """CLI arguments of a small, quick run (16 px vit_demo, T=1, no demo evaluation)."""
    args = {"output_dir": out, "data": data, "img_size": 16, "batch_size": 4, "steps": 1, "epochs": 2,
            "warmup_epochs": 0.5, "log_every": 1, "save_every": 0, "grid_every": 0, "demo_eval": "false",
            "num_workers": 0, "blr": 0.05}
    args.update(over)
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return argv


def read_summary(out):
    with open(os.path.join(out, "summary.json")) as fh:
        return json.load(fh)
