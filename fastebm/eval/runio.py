"""What every evaluation run shares: process set-up, seeding, data loaders and its output files.

Outputs of a run in ``--output_dir`` (rank 0 writes; every file atomically):
``metrics.jsonl`` (one record per epoch, or per k), ``tb/`` (TensorBoard), ``summary.json``
(the result, the resolved config and the data/model description), ``results.md`` (a short
Markdown table) and a PNG (accuracy per epoch, or k-NN accuracy against k).
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler

from ..data.sampling import generator_for, mix_seed
from .. import distributed
from ..checkpoint import FINETUNE_CHECKPOINT, LAST, TRAIN_CONFIG
from ..errors import DistributedSetupError, UsageError
from .backbone import eval_size
from .config import COMMANDS, to_dict
from ..files import atomic_write, atomic_write_json, atomic_write_text

SUMMARY_FILE = "summary.json"
CKPT_FILE = FINETUNE_CHECKPOINT  # a fine-tuning run's resumable state
TABLE_FILE = "results.md"
EPOCH_STREAM = 21  # seeds each epoch's global RNGs (augmentation, Mixup, drop-path): resume is exact


@dataclass
class Run:
    """Process facts of one evaluation run."""

    command: str
    device: torch.device
    autocast: Optional[torch.dtype]
    rank: int = 0
    world: int = 1
    owns_group: bool = False
    t_start: float = field(default_factory=time.time)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def autocast_ctx(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    def close(self) -> None:
        if self.owns_group:
            distributed.destroy_distributed()


def start_run(command: str, cfg) -> Run:
    """Joins torchrun's process group when launched by it; picks the device and the autocast dtype."""
    owns = not distributed.is_initialized()
    try:
        info = distributed.init_distributed(cfg.device, "auto", getattr(cfg, "dist_timeout", None))
    except DistributedSetupError as exc:
        raise UsageError(str(exc)) from None
    device = info.device if info.distributed else _resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if precision == "bf16" else None
    return Run(command, device, autocast, distributed.rank(), distributed.world_size(), owns and info.distributed)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu (or auto)")
        dev = torch.device(name if ":" in name else "cuda:0")
        if dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def seed_epoch(seed: int, epoch: int) -> None:
    """Global RNGs as a pure function of (seed, epoch), so a run resumed at an epoch boundary repeats it exactly."""
    s = mix_seed(seed, EPOCH_STREAM, epoch)
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)


def num_workers(cfg, kind: str) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 0 if kind == "builtin" else min(8, os.cpu_count() or 1)


class ShardSampler(Sampler):
    """Rank r takes indices r, r + world, ...: every image exactly once over the job (no padding)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochShuffle(Sampler):
    """This rank's slice of a (seed, epoch)-seeded permutation, cut to whole global batches (drop_last)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.epoch = 0
        self.per_rank = (n // (batch * world)) * batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=generator_for(self.seed, 1, self.epoch)).tolist()
        return iter(perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank])

    def __len__(self) -> int:
        return self.per_rank


def loader(dataset, batch_size: int, sampler, workers: int, device: torch.device, seed: int = 0, epoch: int = 0,
           drop_last: bool = False) -> DataLoader:
    # An explicit generator: worker seeds then depend on (seed, epoch) only, not on the global RNG.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      generator=generator_for(seed, 3, epoch))


def sum_over_ranks(values: Sequence[float]) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    if distributed.is_initialized():
        t = distributed.all_reduce_mean(t) * distributed.world_size()
    return t.tolist()


# ----------------------------------------------------------------------------- outputs
def prepare_output_dir(run: Run, path: str) -> None:
    """Creates ``--output_dir`` (rank 0). Raises UsageError, on every rank, when it holds another command's
    results (:func:`refuse_other_results`), and when it cannot be created or written."""
    refuse_other_results(run.command, path)
    if run.is_main:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output_dir {path}: cannot create it ({exc.strerror})") from None
        if not os.access(path, os.W_OK):
            raise UsageError(f"--output_dir {path} is not writable")


# What marks a folder as another run's, besides a summary.json it did not write: an unfinished (or killed)
# fine-tuning run has its checkpoint before any summary, a fastebm-train run its last.pt.
_RUN_MARKERS = {CKPT_FILE: "finetune", LAST: "fastebm-train"}
# A fastebm-train run before its first checkpoint has only its config.yaml (and its log, which a new run here
# would replace). It writes every flag, among them restoration flags no fastebm-eval config has, so a user's
# own fastebm-eval config.yaml kept in the folder is not mistaken for one.
_TRAIN_ONLY_KEYS = ("tasks", "grad_mode")


def _is_train_config(path: str) -> bool:
    try:
        with open(os.path.join(path, TRAIN_CONFIG), encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except (OSError, ValueError, RecursionError, yaml.YAMLError):  # unreadable, not YAML, absurdly nested
        return False
    return isinstance(values, dict) and all(key in values for key in _TRAIN_ONLY_KEYS)


def refuse_other_results(command: str, path: str) -> None:
    """Raises UsageError when ``path`` holds results that fastebm-eval ``command`` would overwrite: a
    ``summary.json`` another command (or program) wrote, or one it cannot read; a fine-tuning checkpoint
    (unless ``command`` is finetune, which guards it with --resume); a fastebm-train run (its ``last.pt``,
    or before its first checkpoint its ``config.yaml``). The same
    command's finished results are replaced (a k-NN or probe run is repeated from the start)."""
    fix = f"which fastebm-eval {command} would overwrite: give another --output_dir"
    for name, owner in _RUN_MARKERS.items():
        if owner != command and os.path.exists(os.path.join(path, name)):
            whose = f"fastebm-eval {owner}" if owner == "finetune" else owner
            raise UsageError(f"--output_dir {path} holds a {whose} run ({name}), {fix}")
    if _is_train_config(path):
        raise UsageError(f"--output_dir {path} holds a fastebm-train run ({TRAIN_CONFIG}), {fix}")
    summary = os.path.join(path, SUMMARY_FILE)
    if not os.path.lexists(summary):
        return
    try:
        with open(summary, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError, RecursionError) as exc:  # a folder, a dangling link, not JSON, absurdly nested
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(f"--output_dir {path} holds a {SUMMARY_FILE} fastebm-eval cannot read ({why}), {fix} "
                         f"(or remove that file)") from None
    other = record.get("command") if isinstance(record, dict) else None
    if other == command:
        return
    whose = f"fastebm-eval {other}'s" if other in COMMANDS else "another program's"
    raise UsageError(f"--output_dir {path} holds {whose} results ({SUMMARY_FILE}), {fix}")


def base_summary(run: Run, cfg, bb, data) -> Dict[str, Any]:
    return {"command": run.command, "status": "completed", "model": bb.preset, "timm_name": bb.timm_name,
            "init": bb.source, "ckpt": bb.path, "arch": bb.arch, "img_size": eval_size(cfg, bb), "data": data.description,
            "num_classes": data.num_classes, "train_images": len(data.train), "val_images": len(data.val),
            "few_shot": cfg.few_shot, "seed": cfg.seed, "device": str(run.device), "world_size": run.world}


def finish(run: Run, cfg, summary: Dict[str, Any], table: str, plot) -> Dict[str, Any]:
    """summary.json, results.md and the PNG (rank 0); returns the summary."""
    summary["wall_time_s"] = time.time() - run.t_start
    summary["config"] = to_dict(cfg)
    if run.is_main:
        out = cfg.output_dir
        atomic_write_text(os.path.join(out, TABLE_FILE), table)
        if plot is not None:
            name, draw = plot
            summary["plot"] = os.path.join(out, name)
            atomic_write(summary["plot"], draw)
        atomic_write_json(os.path.join(out, SUMMARY_FILE), summary)
    distributed.barrier()
    return summary


def what_line(summary: Dict[str, Any]) -> str:
    init = summary["ckpt"] if summary["init"] in ("checkpoint", "export") else f"--init {summary['init']}"
    return f"{summary['model'] or 'ViT'} from {init}; {summary['data']}: {summary['train_images']} train / {summary['val_images']} val images"


def plot_curves(path, xs, curves: Dict[str, Sequence[float]], xlabel: str, title: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for label, ys in curves.items():
        ax.plot(xs, [100.0 * y for y in ys], marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    if logx:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
