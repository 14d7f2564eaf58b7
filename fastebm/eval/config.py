"""``fastebm-eval`` settings: one dataclass per sub-command, parsed from flags and a YAML file.

Every field is a flag of its sub-command (same name, MAE/timm spelling) and a key of the YAML
file given with ``--config``; flags override the file. A ``None`` default marked "recipe" is
filled from :mod:`fastebm.eval.recipes` by ``--recipe``: by default the built-in digits get ``small``,
which suits a small ViT on a small data set, and folders get ``imagenet``, MAE's ImageNet recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Type

from ..errors import UsageError
from ..settings import (ArgumentParser, FieldHelpFormatter, add_config_flag, add_field_flags, check_device, coerce,
                        read_config_file, to_dict)
from ..settings import check_seed
from ..settings import option as _opt
from .recipes import RECIPE_CHOICES, fill_recipe

COMMANDS = ("finetune", "linprobe", "knn")
INITS = ("random", "fastebm")
POOLS = ("cls", "avg")
GLOBAL_POOLS = ("avg", "token")
PRECISIONS = ("auto", "bf16", "fp32")
HEAD_INITS = ("random", "zero", "probe")
_OUTPUT_HELP = "where metrics.jsonl, summary.json, results.md and the plot go"


@dataclass
class CommonConfig:
    """What to evaluate, on which data, where the outputs go."""

    ckpt: Optional[str] = _opt(None, "a fastebm training checkpoint (last.pt) or an exported backbone (.safetensors/.pth); "
                               "this or --init is required")
    init: Optional[str] = _opt(None, "instead of --ckpt: random (timm's default init) or fastebm (EnergyViT's init); the "
                               "baseline; this or --ckpt is required", choices=INITS)
    model: Optional[str] = _opt(None, "fastebm preset; with --ckpt it must match the checkpoint (default: the checkpoint's; vit_demo with --init)")
    img_size: Optional[int] = _opt(None, "input size in px; none = the size the backbone was pretrained at (an export's timm "
                                    "test_input_size if it names one; with --init, the size fastebm-train pretrains the preset at: "
                                    "16 for vit_demo); pos_embed is resampled when different")
    data: Optional[str] = _opt(None, "folder with train/ and val/ class folders (ImageNet layout); none = built-in digits")
    train_dir: Optional[str] = _opt(None, "training class folders (instead of --data)")
    val_dir: Optional[str] = _opt(None, "validation class folders (instead of --data)")
    few_shot: Optional[int] = _opt(None, "keep K labelled training images per class (drawn with --seed); none = all")
    batch_size: Optional[int] = _opt(None, "images per process per step (recipe)")
    num_workers: Optional[int] = _opt(None, "data-loader workers; none = 0 for built-in data, min(8, CPUs) for folders")
    seed: int = _opt(0, "seed of initialisation, few-shot draw, data order and augmentation")
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda, cuda:N; under torchrun each process takes cuda:LOCAL_RANK")
    precision: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32", choices=PRECISIONS)
    # each command overrides this default with its own folder, so that one command's results never stand where
    # another's would be written
    output_dir: str = _opt("./fastebm_eval", _OUTPUT_HELP)
    interpolation: Optional[str] = _opt(None, "resize interpolation (recipe)")
    crop_pct: Optional[float] = _opt(None, "evaluation centre-crop fraction (recipe; 1 = resize only)")
    recipe: str = _opt("auto", "defaults of the flags whose help says 'default: from --recipe': small (the built-in digits' recipe, for a few thousand "
                       "small images), imagenet (MAE's ImageNet recipe), or auto (small for the built-in digits, imagenet "
                       "for folders); flags and --config keys win over it; summary.json records the one used",
                       choices=RECIPE_CHOICES)


@dataclass
class FeatureConfig:
    """Frozen-feature settings shared by linprobe and knn."""

    pool: str = _opt("avg", "feature: avg (mean of patch tokens) or cls (class token)", choices=POOLS)
    layer: Optional[int] = _opt(None, "block whose output is the feature, 1..depth; none = the last")
    final_norm: bool = _opt(True, "apply the backbone's final LayerNorm to the chosen block's tokens")


@dataclass
class FinetuneConfig(CommonConfig):
    """MAE's end-to-end fine-tuning recipe on timm parts."""

    output_dir: str = _opt("./fastebm_eval/finetune", _OUTPUT_HELP + ", and checkpoint.pt")

    epochs: Optional[int] = _opt(None, "epochs; the schedule spans them (recipe; small: enough for 1,000 optimiser steps, 2,000 with >= 32 labelled images per class)")
    max_epochs: Optional[int] = _opt(None, "stop after this many epochs without reshaping the schedule (resume later); none = all")
    warmup_epochs: Optional[float] = _opt(None, "linear warm-up epochs (recipe; small: 10 %% of --epochs)")
    eval_every: Optional[int] = _opt(None, "epochs between validation passes, the last epoch always (recipe; small: ~25 per run)")
    accum_iter: int = _opt(1, "micro-steps accumulated per optimiser step")
    blr: Optional[float] = _opt(None, "base learning rate: lr = blr * effective batch / 256 (recipe)")
    lr: Optional[float] = _opt(None, "absolute learning rate, replacing the blr scaling (--blr is then ignored and "
                             "not recorded); none = from --blr")
    min_lr: Optional[float] = _opt(None, "lower bound of the cosine schedule (recipe)")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on norms, biases, pos_embed, cls_token)")
    layer_decay: Optional[float] = _opt(None, "layer-wise lr decay, timm's optimizer factory (recipe; 1 = off)")
    opt: str = _opt("adamw", "optimizer name for timm.optim.create_optimizer_v2")
    drop_path: Optional[float] = _opt(None, "stochastic depth rate (recipe)")
    clip_grad: Optional[float] = _opt(None, "clip the gradient norm; 0 = off (recipe: small 1.0; imagenet off, as MAE)")
    global_pool: str = _opt("avg", "classifier input: avg (mean of normed patch tokens) or token (class token)", choices=GLOBAL_POOLS)
    smoothing: float = _opt(0.1, "label smoothing")
    mixup: Optional[float] = _opt(None, "Mixup alpha, 0 = off (recipe: imagenet 0.8; small 0)")
    cutmix: Optional[float] = _opt(None, "CutMix alpha, 0 = off (recipe: imagenet 1.0; small 0)")
    mixup_prob: float = _opt(1.0, "probability of applying Mixup or CutMix to a batch")
    mixup_switch_prob: float = _opt(0.5, "probability of CutMix instead of Mixup when both are on")
    mixup_mode: str = _opt("batch", "how Mixup/CutMix parameters are drawn: batch, pair, elem", choices=("batch", "pair", "elem"))
    aa: Optional[str] = _opt(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1-mmax9, or 'off' (recipe)")
    reprob: Optional[float] = _opt(None, "random-erasing probability (recipe: imagenet 0.25; small 0)")
    remode: str = _opt("pixel", "random-erasing fill: pixel, rand, const", choices=("pixel", "rand", "const"))
    recount: int = _opt(1, "random-erasing count")
    scale_min: Optional[float] = _opt(None, "smallest RandomResizedCrop area fraction (recipe)")
    hflip: Optional[float] = _opt(None, "horizontal-flip probability (recipe; small: 0, as digits are not mirror-symmetric)")
    model_ema: bool = _opt(False, "also keep and evaluate an EMA of the weights (timm ModelEmaV3)")
    model_ema_decay: float = _opt(0.9999, "EMA decay per optimiser step")
    head_init_std: float = _opt(2e-5, "std of the new classifier's truncated-normal init (MAE; same for every --init)")
    head_init: Optional[str] = _opt(None, "new classifier: random (trunc_normal, --head_init_std; MAE), zero, or probe (LP-FT, "
                                    "Kumar et al. 2022: an L2-regularised logistic-regression probe fitted on the frozen "
                                    "features of the same labels, then fine-tuned with the backbone) (recipe: small "
                                    "probe, imagenet random)", choices=HEAD_INITS)
    resume: Optional[str] = _opt(None, "checkpoint of an interrupted fine-tuning run, or 'auto' (OUTPUT_DIR/checkpoint.pt if present); "
                                 "refused when a flag that changes the results differs from the run's (docs/evaluation.md)")
    dist_timeout: Optional[float] = _opt(None, "seconds a collective waits for a peer under torchrun; none = 120 with "
                                         "gloo, 300 with nccl")
    save_ckpt: bool = _opt(True, "write OUTPUT_DIR/checkpoint.pt after every evaluated epoch (needed for --resume)")


@dataclass
class LinprobeConfig(CommonConfig, FeatureConfig):
    """Frozen backbone, MAE's head: BatchNorm without affine + linear layer."""

    output_dir: str = _opt("./fastebm_eval/linprobe", _OUTPUT_HELP)

    epochs: Optional[int] = _opt(None, "epochs over the cached features (recipe)")
    warmup_epochs: Optional[float] = _opt(None, "linear warm-up epochs (recipe)")
    blr: Optional[float] = _opt(None, "base learning rate: lr = blr * batch / 256 (recipe)")
    lr: Optional[float] = _opt(None, "absolute learning rate, replacing the blr scaling (--blr is then ignored and "
                             "not recorded); none = from --blr")
    min_lr: float = _opt(0.0, "lower bound of the cosine schedule")
    weight_decay: float = _opt(0.0, "weight decay (MAE: 0)")
    opt: str = _opt("lars", "lars (timm Lars, MAE's setting: no adaptation of the bias) or sgd", choices=("lars", "sgd"))
    momentum: float = _opt(0.9, "momentum")
    head_init_std: float = _opt(0.01, "std of the linear head's truncated-normal init (MAE)")


@dataclass
class KnnConfig(CommonConfig, FeatureConfig):
    """Weighted k-NN on L2-normalised frozen features (DINO's protocol)."""

    output_dir: str = _opt("./fastebm_eval/knn", _OUTPUT_HELP)

    k: int = _opt(20, "neighbours that vote")
    temperature: float = _opt(0.07, "vote weight exp(cosine / temperature)")
    k_sweep: List[int] = _opt((1, 5, 10, 20, 50, 100, 200), "values of k for the accuracy-vs-k plot and table")


CONFIGS: Dict[str, Type[CommonConfig]] = {"finetune": FinetuneConfig, "linprobe": LinprobeConfig, "knn": KnnConfig}


# ----------------------------------------------------------------------------- parsing
class RecipeHelpFormatter(FieldHelpFormatter):
    """Field help, where a flag whose default comes from ``--recipe`` (help "... (recipe...)") says so."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        return text.replace("(recipe", "(default: from --recipe") if action.default is None else text


def build_parser(prog: str = "fastebm-eval") -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Downstream evaluation of a pretrained backbone: fine-tuning, "
                            "linear probe or k-NN, on built-in digits or an ImageNet-style folder.")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,linprobe,knn}", parser_class=ArgumentParser)
    helps = {"finetune": "end-to-end fine-tuning (MAE recipe on timm parts)",
             "linprobe": "linear probe on frozen features (MAE head, LARS)",
             "knn": "weighted k-NN on frozen features (DINO)"}
    for name in COMMANDS:
        p = sub.add_parser(name, help=helps[name], description=helps[name], formatter_class=RecipeHelpFormatter)
        add_config_flag(p)
        add_field_flags(p, CONFIGS[name])
    return parser


def parse_args(argv: Optional[List[str]] = None):
    """Command line -> (command, checked config). Raises UsageError (or SystemExit(0) for --help)."""
    parser = build_parser()
    ns, _ = parser.parse_known_args(argv)
    if ns.command is None:
        raise UsageError("give a sub-command: finetune, linprobe or knn (see --help)")
    cls = CONFIGS[ns.command]
    if getattr(ns, "config", None):
        sub = parser._subparsers._group_actions[0].choices[ns.command]
        sub.set_defaults(**read_config_file(ns.config, cls))
    ns = parser.parse_args(argv)
    cfg = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    return ns.command, validate(cfg)


def make_config(command: str, cfg=None, **overrides):
    """Python API: a checked config of ``command`` from a config object, a dict and/or keywords."""
    if command not in CONFIGS:
        raise UsageError(f"unknown evaluation {command!r}; choose from {', '.join(COMMANDS)}")
    cls = CONFIGS[command]
    values: Dict[str, Any] = {}
    if cfg is not None:
        values.update(to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    values.update(overrides)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in fields)
    if unknown:
        raise UsageError(f"{command}: unknown setting(s) {unknown}")
    checked = {k: coerce(cls, fields[k], v, f"--{k}") for k, v in values.items()}
    return validate(cls(**checked))


# ----------------------------------------------------------------------------- checks
def _positive(cfg, names, strict=True):
    for name in names:
        v = getattr(cfg, name, None)
        if v is None:
            continue
        if v != v or v in (float("inf"), float("-inf")) or (v <= 0 if strict else v < 0):
            raise UsageError(f"--{name} must be a finite number {'>' if strict else '>='} 0 (got {v})")


def validate(cfg):
    """Checks what argparse cannot, fills the recipe defaults; raises UsageError naming the flag (e.g.
    a --ckpt or --resume that does not exist or is a folder: the message names the files to give)."""
    from ..models import PRESETS

    if cfg.ckpt is None and cfg.init is None:
        raise UsageError("give --ckpt (last.pt, .safetensors or .pth) or --init random|fastebm for the baseline")
    if cfg.ckpt is not None and cfg.init is not None:
        raise UsageError("--ckpt and --init exclude each other: --init builds an untrained backbone")
    if cfg.ckpt is not None:
        from .backbone import ckpt_file_problem

        problem = ckpt_file_problem(cfg.ckpt)  # missing, or a folder (naming the checkpoints in it)
        if problem:
            raise UsageError(problem)
    if cfg.model is not None and cfg.model not in PRESETS:
        raise UsageError(f"--model: unknown preset {cfg.model!r}; choose from {', '.join(sorted(PRESETS))}")
    if cfg.data is not None and (cfg.train_dir or cfg.val_dir):
        raise UsageError("give either --data DIR (with train/ and val/) or --train_dir and --val_dir, not both")
    if bool(cfg.train_dir) != bool(cfg.val_dir):
        raise UsageError("--train_dir and --val_dir go together (or use --data DIR with train/ and val/)")
    for name in ("img_size", "few_shot", "batch_size", "epochs", "max_epochs", "accum_iter", "recount", "k", "layer",
                 "eval_every"):
        v = getattr(cfg, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be >= 1 (got {v})")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0 (got {cfg.num_workers})")
    _positive(cfg, ["blr", "lr", "temperature", "model_ema_decay", "head_init_std", "layer_decay"])
    _positive(cfg, ["weight_decay", "min_lr", "warmup_epochs", "smoothing", "mixup", "cutmix", "drop_path", "clip_grad",
                    "momentum"], strict=False)
    for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip", "scale_min", "crop_pct", "smoothing",
                 "layer_decay", "drop_path"):
        v = getattr(cfg, name, None)
        if v is not None and not (0.0 <= v <= 1.0):
            raise UsageError(f"--{name} must be between 0 and 1 (got {v})")
    if getattr(cfg, "k_sweep", None) is not None and any(k < 1 for k in cfg.k_sweep):
        raise UsageError(f"--k_sweep values must be >= 1 (got {list(cfg.k_sweep)})")
    cfg.device = check_device(cfg.device)
    if not cfg.output_dir:
        raise UsageError("--output_dir must not be empty")
    if getattr(cfg, "resume", None) not in (None, "auto") and not os.path.isfile(cfg.resume):
        if os.path.isdir(cfg.resume):
            raise UsageError(f"--resume: {cfg.resume!r} is a folder; give its checkpoint file, e.g. "
                             f"{os.path.join(cfg.resume, 'checkpoint.pt')}, or 'auto' with --output_dir {cfg.resume}")
        raise UsageError(f"--resume: {cfg.resume!r} does not exist (give a checkpoint.pt or 'auto')")
    filled = fill_recipe(cfg)
    _check_library_names(cfg)
    if getattr(cfg, "epochs", None) is None:
        return cfg  # built-in fine-tuning: the schedule follows the data size (recipes.resolve_schedule)
    if getattr(cfg, "warmup_epochs", None) is not None and cfg.warmup_epochs > cfg.epochs:
        source = f" (the {cfg.recipe} recipe's; give --warmup_epochs too)" if "warmup_epochs" in filled else ""
        raise UsageError(f"--warmup_epochs ({cfg.warmup_epochs}){source} exceeds --epochs ({cfg.epochs})")
    if getattr(cfg, "max_epochs", None) is not None and cfg.max_epochs > cfg.epochs:
        raise UsageError(f"--max_epochs ({cfg.max_epochs}) exceeds --epochs ({cfg.epochs})")
    return cfg


def _posterize_ops(transform) -> List[Any]:
    """timm's posterize ``AugmentOp`` objects inside a training transform (RandAugment's ``ops``,
    AutoAugment's sub-policies in ``policy``, AugMix's ``ops``)."""
    found = []
    for stage in getattr(transform, "transforms", [transform]):
        groups = [getattr(stage, "ops", None) or []] + list(getattr(stage, "policy", None) or [])
        found += [op for group in groups for op in group if "Posterize" in str(getattr(op, "name", ""))]
    return found


def _check_posterize_bits(aa: str, transform) -> None:
    """Refuse a policy whose posterize can be asked to keep a number of bits Pillow refuses.

    timm maps a magnitude to the bits posterize keeps (its increasing variant: magnitude 10 keeps 0),
    and adds Gaussian noise of std ``mstd`` to the magnitude, clipped to [0, ``mmax`` or 10]. With
    MAE's ``rand-m9-mstd0.5-inc1`` about 2 % of draws reach 10; Pillow 13 raises a ValueError for
    0 bits, so fine-tuning would crash within about a thousand images. Each op's reachable magnitudes
    (noise to 6 std, or [0, m) for timm's uniform ``mstd`` inf) are mapped to bits, and the fewest
    is tried on a tiny image with the installed Pillow, so a Pillow or timm that accepts it passes.

    Raises:
        UsageError: naming the bits and the fix (``-mmax9`` caps the magnitude at 9: at least 1 bit).
    """
    from PIL import Image

    for op in _posterize_ops(transform):
        m, std = float(op.magnitude), float(op.magnitude_std)
        # timm's uniform draw is random.uniform(0, m) = m * random(), random() < 1: m itself is never drawn
        lo, hi = (0.0, m * (1.0 - 2.0 ** -53)) if math.isinf(std) else (m - 6 * std, m + 6 * std) if std > 0 else (m, m)
        upper = float(op.magnitude_max or 10.0)
        bits, at = min((int(op.level_fn(v, op.hparams)[0]), v) for v in (max(0.0, min(v, upper)) for v in (lo, hi)))
        try:
            op.aug_fn(Image.new("RGB", (2, 2)), bits)
        except ValueError:
            # RandAugment's increasing posterize loses bits as the magnitude grows, so its -mmax cap
            # fixes it; other policies lose them at a fixed or low magnitude
            # (timm keeps the first -mmax it reads, so a second one appended would not help)
            fix = ("choose another policy or magnitude" if not (aa.startswith("rand") and "Increasing" in op.name)
                   else "lower its -mmax to 9" if "-mmax" in aa else "cap the magnitude with -mmax9")
            raise UsageError(f"--aa {aa!r}: timm's {op.name} can keep {bits} bits per channel (its magnitude can "
                             f"reach {at:g}), which the installed Pillow refuses mid-run; {fix} (e.g. "
                             "rand-m9-mstd0.5-inc1-mmax9, the imagenet recipe's, augmix-m5-w4-d2, or original)") from None


def _check_library_names(cfg) -> None:
    """--seed's range, and the names timm resolves (--interpolation, --aa, --opt), checked before anything
    is written: timm itself answers a KeyError, an AssertionError or a registry ValueError."""
    check_seed(cfg.seed)
    from timm.data import create_transform

    aa = getattr(cfg, "aa", None)
    try:
        create_transform(input_size=8, is_training=False, interpolation=cfg.interpolation)
    except (KeyError, ValueError, AssertionError):
        raise UsageError(f"--interpolation {cfg.interpolation!r}: choose bicubic, bilinear, nearest, "
                         "lanczos, box or hamming") from None
    if aa not in (None, "off"):
        try:
            policy = create_transform(input_size=8, is_training=True, auto_augment=aa)
        except (KeyError, ValueError, AssertionError, IndexError):
            raise UsageError(f"--aa {aa!r} is not a timm augmentation policy (e.g. rand-m9-mstd0.5-inc1-mmax9, "
                             "augmix-m5-w4-d2, original, or off)") from None
        _check_posterize_bits(aa, policy)
    if isinstance(cfg, FinetuneConfig):
        from timm.optim import list_optimizers

        if cfg.opt.lower() not in list_optimizers():
            raise UsageError(f"--opt {cfg.opt!r} is not a timm optimizer (e.g. adamw, lamb, lars, sgd; "
                             "timm.optim.list_optimizers() lists them)")
