"""The fields of a training run: one flat dataclass, every field with its default and help text.

Each field is a flag of ``fastebm-train`` (same name, :mod:`.flags`) and a key of the YAML config
file (:mod:`.files`); its annotation gives the flag's type and its metadata the help and choices.
The defaults run the built-in demo (``fastebm-train`` with no arguments).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ... import distributed
from ...corrupt import SAMPLE_TASKS
from ...data.streams import LOADERS
from ...energy import ENERGIES
from ...engines import ENGINES
from ...restore import GRAD_MODES
from ...settings import option as _opt
from ...settings import to_dict

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Fields that describe how to start this invocation, not the run: left out of OUTPUT_DIR/config.yaml
# (a config.yaml reused with --config must never overwrite a run by itself).
NOT_SAVED = ("overwrite",)


def attn_backend_choices() -> List[str]:
    """``auto`` plus the attention backends registered in :mod:`fastebm.ops` (importable here)."""
    from ...ops import available_backends

    return ["auto", *available_backends()]


@dataclass
class TrainConfig:
    """All knobs of one training run (see ``fastebm-train --help``)."""

    # model and method
    model: str = _opt("vit_demo", "model preset (vit_demo, vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16)")
    img_size: Optional[int] = _opt(None, "pretraining resolution in pixels; none = the preset's pretraining size (16 for vit_demo, "
                                    "the size fastebm-eval then evaluates it at; the preset's img_size for the others). "
                                    "On the built-in data 8 epochs at 16 px cost what 2 at 32 px cost and gave better frozen features "
                                    "and fine-tuning level with them (docs/quality.md, Quality per FLOP)")
    energy: str = _opt("sqnorm", ("energy head: sqnorm (pre-norm tokens), sqnorm_post, linear (on the built-in benchmark linear leaves a "
                                   "backbone that fine-tuning fits poorly: docs/quality.md)"), choices=ENERGIES)
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
    epochs: int = _opt(8, "epochs; the learning-rate schedule spans them (8 for the built-in demo at 16 px: docs/quality.md; "
                            "set it for your data)")
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
        return to_dict(self)

    @property
    def task_params(self) -> Dict[str, Dict[str, Any]]:
        return {"mim": {"ratio": self.mask_ratio}}
