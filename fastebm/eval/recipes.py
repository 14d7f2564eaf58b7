"""Default hyper-parameters of each evaluation: two recipes, ``small`` and ``imagenet``.

``--recipe auto`` (the default) gives the built-in digits ``small`` and folder data ``imagenet``;
``--recipe small`` gives a folder of a few thousand small images (the texture benchmark,
benchmarks/quality/textures.py) the digits' recipe, whose schedule follows the data size.

``imagenet`` (folder data by default) is MAE's ImageNet recipes (He et al. 2022, "Masked
Autoencoders Are Scalable Vision Learners", appendix A.1-A.2; ViT-B column): fine-tuning with AdamW, layer decay 0.65,
RandAugment, Mixup/CutMix, label smoothing and random erasing; linear probing with LARS, a
BatchNorm (no affine) + linear head and blr 0.1.

``small`` has the same parts adapted to a small 4-block ViT (``vit_demo``: patch 4, width 128, depth
4), a tiny data set and a CPU budget; it was made for the built-in digits (1,300 training / 497
held-out 8x8 digits upsampled to the evaluation size). Its values were chosen at 32 px; since round
12 fastebm-eval evaluates a default
(16 px) vit_demo backbone, and an untrained vit_demo, at 16 px with the same values. Fine-tuning is a
fixed number of optimiser steps, 1,000 with few labels and 2,000
with many (:func:`resolve_schedule`), gradient norm clipped at 1, without Mixup/CutMix, RandAugment and random erasing (in 1,000 steps
they kept a randomly initialised ViT near chance), no horizontal flip (digits are not
mirror-symmetric), crops that keep at least 80 % of the digit with few labels and no crop with
many (:func:`resolve_crop`), a base lr of 32e-3 with few labels and 16e-3 with many
(:func:`resolve_blr`), no stochastic depth, no centre crop
at evaluation, layer decay 0.75 (4 blocks instead of 12); the linear probe's LARS rate suits batch
64. Both were chosen on a validation split of the training digits, on the random-initialisation
arm (docs/evaluation.md and docs/quality.md record how); the lr was then searched for timm's
init, EnergyViT's init and a fastebm backbone alike with one grid (rounds 6 to 8). The
values are the same for every ``--init``/``--ckpt``: they are never tuned per arm.

RandAugment: MAE's ``rand-m9-mstd0.5-inc1`` with ``mmax9`` appended. timm's increasing posterize
maps magnitude 10 to 0 kept bits, which Pillow 13 refuses with a ValueError; the magnitude noise
(std 0.5 around 9) reaches 10 for ~2 % of draws, so without the cap a run crashes within about a
thousand images. Capping at 9 keeps at least one bit and changes nothing else.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"

RECIPES: Dict[str, Dict[str, Dict[str, Any]]] = {
    # the built-in digits' recipe, for small data sets of small images (--recipe small)
    "small": {
        # epochs/warm-up/eval_every: set from the data size by resolve_schedule (UPDATE_BUDGET or UPDATE_BUDGET_MANY steps)
        # drop_path 0: with LP-FT the head starts as a probe of the deterministic backbone; stochastic depth 0.1
        # drops whole residual branches of a 4-block model in train mode, and on a fastebm backbone (whose last
        # block cancels most of the residual stream) raised that head's loss on clean training digits from 0.2
        # to 14 (docs/quality.md). Chosen on timm's random init, where 0 also scored higher (validation split).
        # clip_grad 1: every built-in fine-tuning spiked in warm-up (train loss 1.5 -> 4.2 on timm's init); on the
        # validation split, timm's init, clipping scored 0.910 against 0.887 (1,000 labels; docs/quality.md, round 3 = recipe pilot round 4)
        # blr: BLR_FEW / BLR_MANY, filled by resolve_blr unless the user gives --blr or --lr
        "finetune": dict(batch_size=32, min_lr=1e-6, layer_decay=0.75, drop_path=0.0, mixup=0.0,
                         cutmix=0.0, aa="off", reprob=0.0, hflip=0.0, interpolation="bicubic",
                         crop_pct=1.0, head_init="probe", clip_grad=1.0),
        # linprobe epochs/warm-up: set from the number of labels by resolve_probe_schedule (PROBE_UPDATE_BUDGET steps)
        "linprobe": dict(batch_size=64, blr=100.0, interpolation="bicubic", crop_pct=1.0),
        "knn": dict(batch_size=256, interpolation="bicubic", crop_pct=1.0),
    },
    # MAE's ImageNet recipe (--recipe imagenet)
    "imagenet": {
        "finetune": dict(epochs=100, warmup_epochs=5, eval_every=1, batch_size=64, blr=5e-4, min_lr=1e-6, layer_decay=0.65,
                         drop_path=0.1, mixup=0.8, cutmix=1.0, aa=RAND_AUGMENT, reprob=0.25, scale_min=0.08,
                         hflip=0.5, interpolation="bicubic", crop_pct=0.875, head_init="random"),
        "linprobe": dict(epochs=90, warmup_epochs=10, batch_size=512, blr=0.1, interpolation="bicubic", crop_pct=0.875),
        "knn": dict(batch_size=256, interpolation="bicubic", crop_pct=0.875),
    },
}


# Built-in digits: the fine-tuning schedule is a fixed number of optimiser steps. With few labels
# 1,000 steps are already ~300 epochs and fit the training images (train top-1 0.98-1.0); with many
# (at least MANY_PER_CLASS labelled images per class) 1,000 steps are ~30 epochs and left timm's
# random init at train top-1 0.93. On the validation split, 1,000 labels, 2,000 steps scored 0.933
# against 0.887 (docs/quality.md, round 3 = recipe pilot round 4).
UPDATE_BUDGET = 1000
UPDATE_BUDGET_MANY = 2000
WARMUP_FRACTION = 0.1  # of the epochs (MAE: 5 of 100 for ViT-B)
EVALS_PER_RUN = 25  # validation passes of a built-in run (every epoch when it has <= 25)
# Built-in digits, linear probe: a fixed number of LARS steps, MAE's 90 epochs (10 of warm-up) on the
# 1,300 training digits at batch 64. As 90 epochs, 100 labels (--few_shot 10) got 90 steps: an
# unconverged probe (top-1 0.40 on timm's random init and 0.56 on a 2-epoch fastebm backbone, against
# 0.59 and 0.66 after 1,800 steps; docs/quality.md).
PROBE_UPDATE_BUDGET = 1800
PROBE_WARMUP_FRACTION = 10 / 90
# Built-in digits, fine-tuning crop (RandomResizedCrop's smallest area fraction) by labelled images per
# class. Validation split of the training digits, timm's random init, LP-FT, drop path 0: scale 0.8 scored
# 0.833 with 10 per class and 0.863 with 100 per class; scale 1.0 0.713 and 0.887.
# (Scale 1.0 is no augmentation: at the full area no other aspect ratio fits a square image, and timm's
# RandomResizedCrop falls back to the whole image.)
# Few labels need the crop's variety, many do not; the threshold is the geometric middle of 10 and 100.
CROP_SCALE_MIN_FEW, CROP_SCALE_MIN_MANY, MANY_PER_CLASS = 0.8, 1.0, 32


# Built-in digits, fine-tuning base lr (lr = blr x 32 / 256), with few labels and with many. It was searched for
# each compared arm with one grid on the validation split (docs/quality.md, rounds 6 to 8; one-axis stages, mean
# validation top-1); timm's random init, on which every built-in value is chosen, sets it.
# All 1,300 digits: base lr 2e-3 / 4e-3 / 8e-3 / 16e-3 / 32e-3 at layer decay 0.75, layer decay 0.65 / 0.9 / 1.0 at
# 4e-3 and 0.9 at 16e-3. Round 6: every arm chose 16e-3 (timm's init 0.947 -> 0.973, EnergyViT's 0.943 -> 0.967, a
# 2-epoch fastebm backbone 0.957 -> 0.992). Round 7: 32e-3 tied it on timm's init (4 seeds: 0.9725 against 0.9717,
# a quarter of one validation digit) and was unstable on the test digits (one seed 0.903); a tie does not change a
# default. 100 labels (--few_shot 10): 4e-3 / 8e-3 / 16e-3 / 32e-3 / 64e-3; timm's init 0.835 / 0.867 / 0.910 (round
# 7) / 0.942 / 0.940 (round 8): 32e-3, the choice of the fastebm backbone too (64e-3 diverged on one of its seeds).
# Those searches ran at 32 px. Round 13 repeated them at 16 px (vit_demo's pretraining and evaluation size; two
# seeds): all labels, timm's init 0.983 at 16e-3 / 0.988 at 32e-3 and a fastebm backbone 0.993 / 1.000; 100 labels,
# timm's init 0.923 at 32e-3 / 0.925 at 64e-3 and fastebm 0.958 / 0.953. Margins of half a validation digit to
# two are ties: the values stay.
BLR_FEW, BLR_MANY = 32e-3, 16e-3


def many_labels(n_train: int, num_classes: int) -> bool:
    """True with at least ``MANY_PER_CLASS`` labelled training images per class (all 1,300 digits: 130)."""
    return n_train >= MANY_PER_CLASS * max(1, num_classes)


def resolve_schedule(cfg, steps_per_epoch: int, n_train: int, num_classes: int) -> None:
    """Fills the fine-tuning epochs, warm-up and eval_every left unset, once the data size is known.

    Built-in digits: ``epochs = ceil(budget / steps_per_epoch)`` with a budget of ``UPDATE_BUDGET``
    (1,000) optimiser steps, or ``UPDATE_BUDGET_MANY`` (2,000) when :func:`many_labels` (50 epochs
    on the 1,300 training digits at batch 32; 334 epochs with 100 labels), warm-up 10 % of it,
    about 25 validation passes. Raises UsageError when a user's ``--warmup_epochs`` or
    ``--max_epochs`` exceeds the epochs.
    """
    from ..errors import UsageError

    if cfg.epochs is None:
        budget = UPDATE_BUDGET_MANY if many_labels(n_train, num_classes) else UPDATE_BUDGET
        cfg.epochs = max(1, math.ceil(budget / max(1, steps_per_epoch)))
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = round(WARMUP_FRACTION * cfg.epochs, 2)
    if cfg.eval_every is None:
        cfg.eval_every = max(1, cfg.epochs // EVALS_PER_RUN)
    if cfg.warmup_epochs > cfg.epochs:
        raise UsageError(f"--warmup_epochs ({cfg.warmup_epochs}) exceeds --epochs ({cfg.epochs})")
    if cfg.max_epochs is not None and cfg.max_epochs > cfg.epochs:
        raise UsageError(f"--max_epochs ({cfg.max_epochs}) exceeds --epochs ({cfg.epochs})")


def resolve_crop(cfg, n_train: int, num_classes: int) -> None:
    """Fills ``scale_min`` left unset (built-in digits) once the labelled set is known.

    ``CROP_SCALE_MIN_MANY`` (1.0) with at least ``MANY_PER_CLASS`` (32) labelled images per class
    (all 1,300 digits: 130), else ``CROP_SCALE_MIN_FEW`` (0.8; ``--few_shot 10``). Folder data has
    MAE's 0.08 from the recipe already.
    """
    if cfg.scale_min is None:
        cfg.scale_min = CROP_SCALE_MIN_MANY if many_labels(n_train, num_classes) else CROP_SCALE_MIN_FEW


def resolve_probe_schedule(cfg, steps_per_epoch: int) -> None:
    """Fills the linear probe's epochs and warm-up left unset (built-in digits) once the data size is known.

    ``epochs = ceil(PROBE_UPDATE_BUDGET / steps_per_epoch)``: 90 on the 1,300 training digits at
    batch 64 (20 steps per epoch), 1,800 with 100 labels (one step per epoch); warm-up 1/9 of it.
    """
    from ..errors import UsageError

    if cfg.epochs is None:
        cfg.epochs = max(1, math.ceil(PROBE_UPDATE_BUDGET / max(1, steps_per_epoch)))
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = round(PROBE_WARMUP_FRACTION * cfg.epochs, 2)
    if cfg.warmup_epochs > cfg.epochs:
        raise UsageError(f"--warmup_epochs ({cfg.warmup_epochs}) exceeds --epochs ({cfg.epochs})")


def command_of(cfg) -> str:
    from .config import FinetuneConfig, LinprobeConfig

    return "finetune" if isinstance(cfg, FinetuneConfig) else "linprobe" if isinstance(cfg, LinprobeConfig) else "knn"


RECIPE_CHOICES = ("auto", *RECIPES)


def recipe_name(cfg) -> str:
    """The recipe a config gets: ``--recipe``, or with ``auto`` (the default) ``small`` for the built-in digits and
    ``imagenet`` for folder data."""
    choice = getattr(cfg, "recipe", "auto")
    if choice != "auto":
        return choice
    return "small" if cfg.data is None and cfg.train_dir is None else "imagenet"


def fill_recipe(cfg) -> List[str]:
    """Sets every ``None`` field that the recipe of (:func:`recipe_name`, command) covers (user values win; under
    ``--lr``, ``blr`` is set to ``None``), and
    ``cfg.recipe`` to the recipe it resolved to (``auto`` becomes ``small`` or ``imagenet``, so a run's
    summary.json and checkpoint name the recipe it ran). Returns the names of the fields it filled."""
    cfg.recipe = recipe_name(cfg)
    filled = []
    for name, value in RECIPES[cfg.recipe][command_of(cfg)].items():
        if getattr(cfg, name, None) is None:
            setattr(cfg, name, value)
            filled.append(name)
    if getattr(cfg, "lr", None) is not None:
        cfg.blr = None  # --lr replaces the blr scaling: a blr (the recipe's or the user's) would be recorded and unused
    return filled


def resolve_blr(cfg, n_train: int, num_classes: int) -> None:
    """Fills the built-in digits' fine-tuning ``blr`` when neither ``--blr`` nor ``--lr`` is given.

    ``BLR_MANY`` (16e-3: lr 2e-3 at batch 32) when :func:`many_labels`, else ``BLR_FEW`` (32e-3). A
    user's ``--blr`` or ``--lr`` wins (``--lr`` leaves ``blr`` unset); folder data has MAE's 5e-4
    from its recipe already.
    """
    if cfg.blr is None and cfg.lr is None:
        cfg.blr = BLR_MANY if many_labels(n_train, num_classes) else BLR_FEW
