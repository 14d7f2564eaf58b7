"""A second, harder benchmark: texture patches of ten photographs that no arm was pretrained on.

The digits benchmark sits near its ceiling with all labels (every arm fine-tunes to 0.96-0.99), so it
cannot tell a good backbone from a random init there. This one is Brodatz-style texture
classification (the protocol of Randen & Husoy 1999, "Filtering for texture classification", IEEE
TPAMI 21(4): a class is one texture image, training and test patches come from disjoint regions of
it), built from scikit-image's bundled photographs, so nothing is downloaded:

* classes: ``brick camera cell clock coins grass gravel moon page text`` (grey, 172x448 to 660x550 px).
  None of them is among fastebm-train's built-in photos (``fastebm.data.builtin.TRAIN_PHOTOS`` and
  ``HELD_OUT_PHOTOS``), and mae.py pretrains on the same built-in data: every arm meets them here first.
  Left out: ``horse`` (a binary silhouette), the synthetic images, and ``cat`` (the held-out ``chelsea``);
* each image is cut into 64 x 64 px tiles; a fixed draw (``SPLIT_SEED``, independent of any run's
  seed) puts 30 % of each image's tiles (at least 2) in the test region and the rest in the training
  region;
* a patch is a 32 x 32 px window inside one tile, at a uniformly drawn position: 130 per class from the
  training tiles (1,300, as the digits) and 50 per class from the test tiles (500). A window whose pixel
  std is under ``MIN_STD`` grey levels (a blank margin of ``page``, the sky of ``camera``) is drawn again:
  no model could classify it;
* written as 32 x 32 grey PNGs in the MAE/ImageNet layout ``OUT/train/<class>/*.png`` and
  ``OUT/val/<class>/*.png``, which ``fastebm-eval --data OUT`` reads (resized to the evaluation size,
  16 px for every arm of the study).

The definition (classes, tile and window sizes, split, counts, ``MIN_STD``) was fixed before any arm
was evaluated on it; the only number looked at while fixing it was the pixel reference (logistic
regression on the raw pixels, :func:`pixel_logistic_regression`), to check that the benchmark is not
near its ceiling.

    python benchmarks/quality/textures.py OUT                                      # writes the folder (about 2 s)
    python benchmarks/quality/textures.py OUT --examples docs/images/textures.png  # ... and draws example patches
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np

CLASSES = ("brick", "camera", "cell", "clock", "coins", "grass", "gravel", "moon", "page", "text")
TILE = 64  # px: the unit of the train/test split
WINDOW = 32  # px: a patch
TEST_TILE_FRACTION = 0.3
MIN_TEST_TILES = 2
TRAIN_PER_CLASS, TEST_PER_CLASS = 130, 50
MIN_STD = 4.0  # grey levels (0-255): a flatter window is drawn again
SPLIT_SEED = 20261201
MAX_DRAWS = 100_000  # per class: a region with no textured window is an error, not a hang
FORMAT_VERSION = 1


def _grey(name: str) -> np.ndarray:
    """scikit-image's bundled grey image ``name`` as uint8 (H, W)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is not a grey uint8 image ({img.shape}, {img.dtype})")
    return img


def split_tiles(shape: Tuple[int, int], rng: np.random.Generator) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """(training tiles, test tiles) of an image of ``shape`` (H, W), each tile its (top, left) corner in px."""
    rows, cols = shape[0] // TILE, shape[1] // TILE
    tiles = [(r * TILE, c * TILE) for r in range(rows) for c in range(cols)]
    if len(tiles) < MIN_TEST_TILES + 1:
        raise ValueError(f"an image of {shape[0]}x{shape[1]} px has {len(tiles)} tiles of {TILE} px; need >= {MIN_TEST_TILES + 1}")
    order = rng.permutation(len(tiles))
    n_test = max(MIN_TEST_TILES, int(round(TEST_TILE_FRACTION * len(tiles))))
    test = sorted(tiles[i] for i in order[:n_test])
    train = sorted(tiles[i] for i in order[n_test:])
    return train, test


def draw_windows(img: np.ndarray, tiles: List[Tuple[int, int]], n: int, rng: np.random.Generator,
                 name: str) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 windows (n, WINDOW, WINDOW), each inside one of ``tiles``, none flatter than ``MIN_STD``, and
    their (top, left) corners in px (n, 2). Raises RuntimeError when ``MAX_DRAWS`` draws find too few."""
    out, corners, draws = [], [], 0
    while len(out) < n:
        draws += 1
        if draws > MAX_DRAWS:
            raise RuntimeError(f"{name}: only {len(out)} of {n} windows with pixel std >= {MIN_STD} in {MAX_DRAWS} draws")
        top, left = tiles[rng.integers(len(tiles))]
        dy, dx = rng.integers(TILE - WINDOW + 1, size=2)
        win = img[top + dy: top + dy + WINDOW, left + dx: left + dx + WINDOW]
        if win.std() >= MIN_STD:
            out.append(win)
            corners.append((top + dy, left + dx))
    return np.stack(out), np.array(corners, dtype=np.int64)


def texture_split(return_regions: bool = False):
    """(x_train uint8 (1300, 32, 32), y_train int64 (1300,), x_test (500, 32, 32), y_test (500,)), labels index CLASSES.

    With ``return_regions`` also {class: {"train_tiles", "test_tiles", "train_corners", "test_corners"}}: the
    split of each image and where each window was cut (for the tests). A pure function of the constants above
    and scikit-image's bundled images: every call returns the same arrays."""
    rng = np.random.default_rng(SPLIT_SEED)
    xs_tr, ys_tr, xs_te, ys_te, regions = [], [], [], [], {}
    for label, name in enumerate(CLASSES):
        img = _grey(name)
        train, test = split_tiles(img.shape, rng)
        x_tr, c_tr = draw_windows(img, train, TRAIN_PER_CLASS, rng, name)
        x_te, c_te = draw_windows(img, test, TEST_PER_CLASS, rng, name)
        xs_tr.append(x_tr)
        xs_te.append(x_te)
        ys_tr.append(np.full(TRAIN_PER_CLASS, label))
        ys_te.append(np.full(TEST_PER_CLASS, label))
        regions[name] = {"train_tiles": train, "test_tiles": test, "train_corners": c_tr, "test_corners": c_te}
    out = (np.concatenate(xs_tr), np.concatenate(ys_tr), np.concatenate(xs_te), np.concatenate(ys_te))
    return (*out, regions) if return_regions else out


def _complete(out: str, manifest: Dict) -> bool:
    """True when ``out`` holds every PNG its manifest promises (a folder someone thinned is not reused)."""
    for split, per_class in (("train", manifest["train_per_class"]), ("val", manifest["test_per_class"])):
        for name in manifest["classes"]:
            folder = os.path.join(out, split, name)
            if not os.path.isdir(folder) or sum(f.endswith(".png") for f in os.listdir(folder)) != per_class:
                return False
    return True


def write_folder(out: str) -> Dict:
    """Writes the benchmark to ``out`` (train/ and val/ class folders of PNGs, ``manifest.json``) atomically:
    it is built in a sibling temporary folder and renamed into place. An ``out`` that holds this version's
    manifest and all its images is kept as it is; an empty folder is filled; any other existing ``out`` raises
    FileExistsError, and a parent that is not a folder NotADirectoryError (nothing is deleted)."""
    from PIL import Image

    out = os.path.abspath(out)
    manifest_path = os.path.join(out, "manifest.json")
    if os.path.isdir(out) and os.listdir(out):
        try:
            with open(manifest_path) as fh:
                manifest = json.load(fh)
        except (OSError, ValueError):
            manifest = None
        if manifest is not None and manifest.get("format_version") == FORMAT_VERSION and manifest.get("classes") == list(CLASSES):
            if _complete(out, manifest):
                return manifest
            raise FileExistsError(f"{out} is this benchmark's folder but images are missing; delete it and run again")
        raise FileExistsError(f"{out} exists and is not this benchmark's folder (no matching manifest.json); "
                              f"give a new path or delete it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is a file; give a folder path")
    parent = os.path.dirname(out)
    blocker = parent
    while blocker and not os.path.exists(blocker):
        blocker = os.path.dirname(blocker)
    if blocker and not os.path.isdir(blocker):
        raise NotADirectoryError(f"{blocker} is a file, so {out} cannot be made; give another path")
    x_tr, y_tr, x_te, y_te = texture_split()
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".textures-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the data set is as readable as any folder
    try:
        for split, xs, ys in (("train", x_tr, y_tr), ("val", x_te, y_te)):
            for i, (x, y) in enumerate(zip(xs, ys)):
                folder = os.path.join(tmp, split, CLASSES[y])
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(x, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
        manifest = {"format_version": FORMAT_VERSION, "classes": list(CLASSES), "tile": TILE, "window": WINDOW,
                    "test_tile_fraction": TEST_TILE_FRACTION, "train_per_class": TRAIN_PER_CLASS,
                    "test_per_class": TEST_PER_CLASS, "min_std": MIN_STD, "split_seed": SPLIT_SEED}
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=1)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def pixel_logistic_regression(seeds: List[int], few_shot: int = 10, img_size: int = 16) -> Dict[str, Dict]:
    """{"lp_100": {seed: top-1}, "lp_all": {seed: top-1}}: logistic regression on the raw pixels of the patches
    resized to ``img_size`` (bicubic, as fastebm-eval resizes them), with the same labelled sets as the
    evaluations (all 1,300 patches, and fastebm-eval's ``--few_shot`` draw for each seed), scored on the 500 test
    patches. scikit-learn ``StandardScaler`` + ``LogisticRegression`` (default C 1.0), as pixels.py on the digits."""
    import torch
    import torch.nn.functional as F

    from pixels import score_pixels

    x_tr, y_tr, x_te, y_te = texture_split()

    def flat(x):
        t = torch.from_numpy(x).float().unsqueeze(1)
        if img_size != WINDOW:
            t = F.interpolate(t, size=(img_size, img_size), mode="bicubic", align_corners=False, antialias=True)
        return t.reshape(len(x), -1).numpy()

    return score_pixels(flat(x_tr), y_tr, flat(x_te), y_te, list(CLASSES), seeds, few_shot)


def plot_examples(path: str, per_split: int = 4) -> None:
    """A picture of the benchmark: per class, the source image with its test tiles shaded, then ``per_split``
    training and ``per_split`` test patches (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    x_tr, y_tr, x_te, y_te, regions = texture_split(return_regions=True)
    cols = 1 + 2 * per_split
    fig, axes = plt.subplots(len(CLASSES), cols, figsize=(cols * 1.05, len(CLASSES) * 1.05), dpi=90)
    for label, name in enumerate(CLASSES):
        ax = axes[label, 0]
        ax.imshow(_grey(name), cmap="gray", vmin=0, vmax=255)
        for top, left in regions[name]["test_tiles"]:
            ax.add_patch(Rectangle((left, top), TILE, TILE, color="tab:orange", alpha=0.55, linewidth=0))
        ax.set_ylabel(name, fontsize=8)
        patches = list(x_tr[y_tr == label][:per_split]) + list(x_te[y_te == label][:per_split])
        for j, win in enumerate(patches):
            axes[label, 1 + j].imshow(win, cmap="gray", vmin=0, vmax=255)
            if label == 0:
                axes[label, 1 + j].set_title("train" if j < per_split else "test", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("test tiles shaded", fontsize=8)
    fig.suptitle(f"texture benchmark: {WINDOW} px patches of {len(CLASSES)} photographs, train and test from disjoint "
                 f"{TILE} px tiles", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder to create (train/ and val/ class folders)")
    ap.add_argument("--examples", default=None, metavar="PNG", help="also draw example patches of every class into this PNG")
    args = ap.parse_args(argv)
    if args.examples:  # checked before anything is written
        folder = os.path.dirname(os.path.abspath(args.examples))
        if not args.examples.lower().endswith(".png") or os.path.isdir(args.examples) or not os.path.isdir(folder):
            print(f"textures.py: error: --examples {args.examples}: give a .png file path in an existing folder", file=sys.stderr)
            return 2
    try:
        manifest = write_folder(args.out)
        if args.examples:
            plot_examples(args.examples)
    except PermissionError:
        print(f"textures.py: error: no permission to write {args.out} (it is built beside it, in its parent folder)",
              file=sys.stderr)
        return 2
    except OSError as exc:  # an existing folder, a file in the way, a full disk
        print(f"textures.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(manifest['classes'])} classes, {manifest['train_per_class']} training and "
          f"{manifest['test_per_class']} test patches each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
