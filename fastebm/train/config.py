"""Training configuration: one flat dataclass, its command-line parser, YAML loading and checks.

Every field is a flag of ``fastebm-train`` (same name) and a key of the YAML config file
(``--config FILE.yaml``); flags given on the command line override the file. MAE's names are
accepted where they mean the same (:data:`ALIASES`: ``--input_size``, ``--data_path``), on the
command line and in the file; ``--eval`` is a deprecated alias of ``--demo_eval``. The defaults
run the built-in demo (``fastebm-train`` with no arguments); ``configs/`` holds starting points
for real data.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import yaml

from .. import __version__, distributed
from ..corrupt import SAMPLE_TASKS
from ..data.streams import LOADERS
from ..energy import ENERGIES
from ..engines import ENGINES
from ..errors import UsageError
from ..restore import GRAD_MODES

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Other tools' flag names with the same meaning (MAE's main_pretrain.py): alias -> field.
ALIASES = {"input_size": "img_size", "data_path": "data"}
# Old names that still work but warn: old -> field.
DEPRECATED = {"eval": "demo_eval"}
# Fields that describe how to start this invocation, not the run: left out of OUTPUT_DIR/config.yaml
# (a config.yaml reused with --config must never overwrite a run by itself).
NOT_SAVED = ("overwrite",)


def attn_backend_choices() -> List[str]:
    """``auto`` plus the attention backends registered in :mod:`fastebm.ops` (importable here)."""
    from ..ops import available_backends

    return ["auto", *available_backends()]


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """All knobs of one training run (see ``fastebm-train --help``)."""

    # model and method
    model: str = _opt("vit_demo", "model preset (vit_demo, vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16)")
    img_size: Optional[int] = _opt(None, "input resolution in pixels; none = the preset's (32 for vit_demo)")
    energy: str = _opt("sqnorm", "energy head: sqnorm (pre-norm tokens), sqnorm_post, linear", choices=ENERGIES)
    steps: int = _opt(2, "restoration gradient steps T per image")
    grad_mode: str = _opt("exact", "gradient through the steps: exact (all steps) or truncated (last step)", choices=GRAD_MODES)
    alpha_init: Optional[float] = _opt(None, "initial restoration step size alpha_t; none = the objective's default")
    noise_sigma: float = _opt(0.0, "Langevin noise per restoration step (0 = off)")
    engine: str = _opt("eager", "how dE/dx with a graph is computed (docs/design.md §4): %(choices)s", choices=ENGINES)
    attn_backend: str = _opt("auto", "attention backend: %(choices)s (auto: triton on CUDA when available, else math)",
                             choices=attn_backend_choices)
    grad_checkpointing: bool = _opt(False, "activation checkpointing in the ViT blocks (less memory, more compute)")
    # pretext tasks
    tasks: List[str] = _opt(("mim", "sr", "denoise", "colorize"), "pretext tasks, mixed per sample (comma or space separated): " + ", ".join(SAMPLE_TASKS) + "; mix = all")
    mask_ratio: float = _opt(0.6, "fraction of patches masked by the mim task")
    # optimisation
    batch_size: int = _opt(32, "images per process per micro-step")
    accum_iter: int = _opt(1, "micro-steps accumulated per optimiser step")
    epochs: int = _opt(1, "epochs; the learning-rate schedule spans them")
    max_steps: Optional[int] = _opt(None, "stop after this many optimiser steps (does not reshape the schedule); none = run all epochs")
    blr: float = _opt(0.024, "base learning rate: lr = blr * effective batch / 256")
    lr: Optional[float] = _opt(None, "absolute learning rate (MAE's --lr): replaces the blr scaling; an error together "
                               "with --blr in the same place; none = from --blr")
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine schedule")
    warmup_epochs: float = _opt(0.1, "linear warm-up length in epochs")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on norms, biases, pos_embed, cls_token, step sizes)")
    clip_grad: Optional[float] = _opt(1.0, "clip the gradient norm to this value (0 or none = off)")
    precision: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp16, fp32", choices=PRECISIONS)
    # data
    data: Optional[str] = _opt(None, "image folder (class sub-folders optional); none = built-in demo data")
    strict_data: bool = _opt(False, "stop on an unreadable image instead of skipping and counting it")
    num_workers: Optional[int] = _opt(None, "data-loader worker processes (DALI: CPU threads); none = 0 for built-in data, "
                                      "min(8, CPUs) for folders")
    loader: str = _opt("auto", "image-folder loader: auto (dali when installed and on CUDA, else torch), torch, dali "
                       "(docs/training.md)", choices=LOADERS)
    # run management
    output_dir: str = _opt("./fastebm_out", "where checkpoints, metrics, pictures and summary.json go")
    resume: Optional[str] = _opt(None, "checkpoint to resume from, or 'auto' (OUTPUT_DIR/last.pt if present, else start fresh)")
    overwrite: bool = _opt(False, "start a new run in an --output_dir that holds one: its checkpoints, metrics, "
                           "pictures and summary are deleted first (without it such a folder is refused)")
    seed: int = _opt(0, "seed of initialisation, data order, augmentation and corruption")
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda, cuda:N; under torchrun each process takes cuda:LOCAL_RANK")
    threads: str = _opt("auto", "CPU threads per process for PyTorch's kernels: a number, or auto (OMP_NUM_THREADS if you set it, "
                        "else the usable cores divided by this job's processes on the machine); see docs/training.md, Threads")
    # multi-process (torchrun); see docs/distributed.md
    dist_backend: str = _opt("auto", "process-group backend under torchrun: auto (nccl on CUDA, gloo on CPU), nccl, gloo",
                             choices=distributed.BACKENDS)
    dist_timeout: Optional[float] = _opt(None, "seconds a collective waits for a peer before the job fails (default 120 with gloo, 300 with nccl)")
    fsdp: bool = _opt(False, "shard parameters, gradients and optimiser state with FSDP2 (whole objective as one unit; see docs/distributed.md)")
    log_every: int = _opt(5, "optimiser steps between metric lines")
    save_every: int = _opt(200, "optimiser steps between checkpoints (0 = only at the end)")
    save_ckpt_freq: int = _opt(0, "also keep OUTPUT_DIR/checkpoint-E.pt after every this many epochs (E = epochs done; "
                               "0 = off)")
    grid_every: int = _opt(50, "optimiser steps between restoration-grid refreshes (0 = only at the end)")
    max_bad_steps: int = _opt(5, "stop after this many non-finite losses in a row")
    demo_eval: bool = _opt(True, "built-in data only: PSNR gain and linear probe before and after training "
                           "(not an evaluate-only mode)")

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (strings, numbers, bools, lists, None) for checkpoints and config.yaml."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), (list, tuple)) else v) for f in dataclasses.fields(self)}

    @property
    def task_params(self) -> Dict[str, Dict[str, Any]]:
        return {"mim": {"ratio": self.mask_ratio}}


# ----------------------------------------------------------------------------- parsing

def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(conv):
    def parse(text):
        if text is None or str(text).strip().lower() in ("none", "null", ""):
            return None
        return conv(text)

    parse.__name__ = conv.__name__
    return parse


@functools.lru_cache(maxsize=None)
def _type_hints() -> Dict[str, Any]:
    return typing.get_type_hints(TrainConfig)  # the annotations evaluated (they are strings here)


def _base_type(f: dataclasses.Field):
    """(type without ``Optional``, whether None is allowed) of a field, from its annotation."""
    hint = _type_hints()[f.name]
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return hint, False


def _is_list(f: dataclasses.Field) -> bool:
    return typing.get_origin(_base_type(f)[0]) is list


def _field_type(f: dataclasses.Field) -> Callable[[Any], Any]:
    """The converter of one flag value (a list field: of one item), derived from the field's annotation."""
    base, optional = _base_type(f)
    if typing.get_origin(base) is list:
        (base,) = typing.get_args(base)
    if base not in (int, float, str, bool):
        raise TypeError(f"TrainConfig.{f.name}: unsupported annotation {base!r}")
    if base is bool:
        return _parse_bool
    return _optional(base) if optional else base


def _choices(f: dataclasses.Field) -> Optional[Sequence[str]]:
    """The allowed values of a field (a callable in the metadata is asked now: registries fill late)."""
    choices = f.metadata.get("choices")
    return list(choices()) if callable(choices) else choices


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag becomes one UsageError line instead of usage text + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastebm-train",
        description="Energy-inspired self-supervised pretraining of a ViT. With no arguments it pretrains "
        "vit_demo on built-in data (digits and bundled photos) and reports PSNR gain and linear-probe accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file whose keys are flag names; command-line flags override it")
    parser.add_argument("--version", action="version", version=f"fastebm {__version__}",
                        help="print fastebm's version and exit")
    for f in dataclasses.fields(TrainConfig):
        kw = dict(default=f.default if f.default is not dataclasses.MISSING else f.default_factory(), help=f.metadata["help"])
        if _is_list(f):
            kw.update(nargs="+", type=_field_type(f))
        elif _base_type(f)[0] is bool:
            kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kw["type"] = _field_type(f)
        if _choices(f) is not None:
            kw["choices"] = _choices(f)
        aliases = [f"--{a}" for a, name in ALIASES.items() if name == f.name]
        parser.add_argument(f"--{f.name}", *aliases, dest=f.name, **kw)
    for old, name in DEPRECATED.items():
        parser.add_argument(f"--{old}", dest=_deprecated_dest(old), default=None, nargs="?", const=True,
                            type=_parse_bool, metavar="BOOL", help=f"deprecated alias of --{name}")
    return parser


def _deprecated_dest(old: str) -> str:
    return f"deprecated_{old}"


def _given_on_command_line(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> set:
    """The fields whose flag (or an alias) appears in ``argv``.

    argparse fills a default only for attributes the namespace lacks, so parsing into a namespace
    where every destination already holds a marker leaves the marker exactly on the flags not given.
    """
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not unset}


def _load_yaml(path: str) -> Dict[str, Any]:
    """The file's mapping with every key a field name (aliases and deprecated names resolved)."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must be a mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: Dict[str, Any] = {}
    spelled: Dict[str, str] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        name = ALIASES.get(key) or DEPRECATED.get(key) or key
        if name not in names:
            raise UsageError(f"config file {path!r} has unknown key {key!r}; keys are flag names such as batch_size")
        if key in DEPRECATED:
            _warn_deprecated(key, f"config file {path!r}: key ")
        if name in out:
            raise UsageError(f"config file {path!r} gives {name} twice (as {spelled[name]} and {key}); keep one")
        out[name], spelled[name] = value, key
    return out


def _warn_deprecated(old: str, where: str) -> None:
    """``where``: "--" (a flag) or "config file 'F': key " (a YAML key)."""
    prefix = "--" if where == "--" else where
    warnings.warn(f"{prefix}{old} is deprecated; use {prefix}{DEPRECATED[old]} (built-in data only: the PSNR gain and "
                  f"linear probe before and after training; not an evaluate-only mode)", FutureWarning, stacklevel=3)


def _coerce_yaml_value(f: dataclasses.Field, value: Any) -> Any:
    """Applies the flag's own converter so that a YAML value is checked like a typed flag."""
    if _is_list(f):
        item = _field_type(f)
        return [item(v) for v in value] if isinstance(value, (list, tuple)) else [item(value)]
    if value is None:
        return None
    try:
        return _field_type(f)(value if not isinstance(value, bool) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UsageError(f"config key {f.name}: invalid value {value!r}") from None


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """Command line (and optional YAML file) -> checked TrainConfig.

    Raises UsageError (bad values, contradictions), DataError (``--loader dali`` without DALI) or
    SystemExit(0) after ``--help`` / ``--version``.
    """
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    from_file: Dict[str, Any] = {}
    if pre.config:
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        from_file = {k: _coerce_yaml_value(fields[k], v) for k, v in _load_yaml(pre.config).items()}
        for k, v in from_file.items():
            choices = _choices(fields[k])
            if choices is not None and v not in choices:
                raise UsageError(f"config key {k}: {v!r} is not one of {list(choices)}")
        parser.set_defaults(**from_file)
    ns = parser.parse_args(argv)
    given = _given_on_command_line(parser, argv)
    for old, name in DEPRECATED.items():
        value = getattr(ns, _deprecated_dest(old))
        if value is None:
            continue
        _warn_deprecated(old, "--")
        if name in given:
            raise UsageError(f"--{old} and --{name} both given; --{old} is the old name of --{name}: keep --{name}")
        setattr(ns, name, value)
        given.add(name)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig)}
    _resolve_lr(values, given, set(from_file))
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _resolve_lr(values: Dict[str, Any], on_command_line: set, in_file: set) -> None:
    """--lr (absolute) replaces the --blr scaling; both in one place is an error; the command line
    overrides the file (a command-line --blr drops the file's lr)."""
    for where, given in (("on the command line", on_command_line), ("in the config file", in_file)):
        if {"lr", "blr"} <= given and values["lr"] is not None:
            raise UsageError(f"--lr and --blr both given {where}: --lr sets the learning rate itself, --blr scales it "
                             f"with the batch (lr = blr * effective batch / 256); give one")
    if "blr" in on_command_line and "lr" not in on_command_line:
        values["lr"] = None


def split_tasks(tasks) -> List[str]:
    out: List[str] = []
    for item in tasks if isinstance(tasks, (list, tuple)) else [tasks]:
        out.extend(t.strip().lower() for t in str(item).replace(",", " ").split() if t.strip())
    return out


def validate(cfg: TrainConfig) -> None:
    """Checks values that argparse's types cannot; raises UsageError naming the flag and the fix."""
    from ..models import PRESETS

    if cfg.model not in PRESETS:
        raise UsageError(f"--model: unknown preset {cfg.model!r}; choose from {', '.join(sorted(PRESETS))}")
    cfg.tasks = split_tasks(cfg.tasks)
    if "mix" in cfg.tasks:  # 'mix' = every task, as in fastebm.corrupt
        cfg.tasks = list(SAMPLE_TASKS)
    if not cfg.tasks:
        raise UsageError("--tasks is empty; give one or more of " + ", ".join(SAMPLE_TASKS))
    bad = [t for t in cfg.tasks if t not in SAMPLE_TASKS]
    if bad:
        raise UsageError(f"--tasks: unknown task(s) {bad}; choose from " + ", ".join(SAMPLE_TASKS))
    positive = ["batch_size", "accum_iter", "epochs", "steps", "log_every", "max_bad_steps"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    for name in ["save_every", "grid_every"]:
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be >= 0 (0 = only at the end; got {getattr(cfg, name)})")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UsageError(f"--max_steps must be >= 1 or none (got {cfg.max_steps})")
    if cfg.img_size is not None and cfg.img_size < 1:
        raise UsageError(f"--img_size must be a positive number of pixels (got {cfg.img_size})")
    patch = PRESETS[cfg.model]["patch_size"]
    if cfg.img_size is not None and cfg.img_size % patch:
        raise UsageError(f"--img_size {cfg.img_size} is not a multiple of {cfg.model}'s patch size {patch}; "
                         f"use e.g. {max(patch, cfg.img_size // patch * patch)}")
    for name in ["blr", "min_lr", "weight_decay", "warmup_epochs", "noise_sigma"]:
        v = getattr(cfg, name)
        if not (v >= 0) or v != v or v == float("inf"):
            raise UsageError(f"--{name} must be a finite number >= 0 (got {v})")
    if cfg.blr == 0:
        raise UsageError("--blr must be > 0")
    if cfg.lr is not None and not (0 < cfg.lr < float("inf")):
        raise UsageError(f"--lr must be a finite number > 0, or none to use --blr (got {cfg.lr})")
    if cfg.save_ckpt_freq < 0:
        raise UsageError(f"--save_ckpt_freq must be >= 0 epochs (0 = off; got {cfg.save_ckpt_freq})")
    if cfg.warmup_epochs > cfg.epochs:
        raise UsageError(f"--warmup_epochs ({cfg.warmup_epochs}) exceeds --epochs ({cfg.epochs})")
    if cfg.alpha_init is not None and not (cfg.alpha_init > 0 and cfg.alpha_init != float("inf")):
        raise UsageError(f"--alpha_init must be a finite number > 0 (got {cfg.alpha_init})")
    if not (0.0 < cfg.mask_ratio < 1.0):
        raise UsageError(f"--mask_ratio must be between 0 and 1 exclusive (got {cfg.mask_ratio})")
    if cfg.clip_grad is not None:
        if cfg.clip_grad < 0 or cfg.clip_grad != cfg.clip_grad:
            raise UsageError(f"--clip_grad must be >= 0 (0 or none = off; got {cfg.clip_grad})")
        if cfg.clip_grad == 0:
            cfg.clip_grad = None
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0 (got {cfg.num_workers})")
    dev = cfg.device.strip().lower()
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {cfg.device!r})")
    cfg.device = dev
    threads = str(cfg.threads).strip().lower()
    if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
        raise UsageError(f"--threads must be auto or a whole number >= 1 (got {cfg.threads!r})")
    cfg.threads = threads
    if cfg.resume is not None and cfg.resume != "auto" and not os.path.isfile(cfg.resume):
        raise UsageError(f"--resume: checkpoint {cfg.resume!r} does not exist (give a file or 'auto')")
    if cfg.resume is not None and cfg.overwrite:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the run in --output_dir, "
                         "--overwrite deletes it; give one")
    if not cfg.output_dir:
        raise UsageError("--output_dir must not be empty")
    check_loader(cfg)
    if cfg.dist_timeout is not None and not (0 < cfg.dist_timeout < float("inf")):
        raise UsageError(f"--dist_timeout must be a number of seconds > 0 (got {cfg.dist_timeout})")


def check_loader(cfg: TrainConfig) -> None:
    """``--loader dali`` needs an image folder and DALI installed: checked before anything is read or written."""
    if cfg.loader != "dali":
        return
    if cfg.data is None:
        raise UsageError("--loader dali: DALI reads image folders (--data DIR); the built-in data is in memory "
                         "already: use --loader torch or auto")
    from ..data.dali import require_dali

    require_dali()  # DaliUnavailable (a DataError, exit 2) naming the install command


def save_yaml(cfg: TrainConfig, path: str) -> None:
    """The resolved configuration as YAML (flag names as keys), written atomically.

    Leaves out :data:`NOT_SAVED` (``overwrite``) and, when ``lr`` is set, ``blr`` (unused then), so
    that the file can be given back to ``--config`` as it is.
    """
    from ..checkpoint import atomic_write

    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SAVED and not (k == "blr" and cfg.lr is not None)}
    text = yaml.safe_dump(values, sort_keys=False)
    atomic_write(path, lambda fh: fh.write(text.encode()))
