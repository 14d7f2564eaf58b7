"""``--loader auto|torch|dali``: which micro-batch stream feeds the trainer, built in one call.

Both streams have the same ``iterate(start_step, end_step)`` contract (``fastebm.data.loader``):
dicts with ``images`` uint8 (B, 3, S, S), ``labels``, ``positions``, ``bad``, ``step``, ``micro``.
The torch stream's images are on the CPU (pinned on CUDA runs); the DALI stream's are already on
``device``. The same samples, labels, crops and skipped files come out of both (see
``fastebm.data.dali``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .dali_index import FileIndex, build_index, default_cache_dir
from .errors import DataError
from .loader import MicroBatchStream
from .sampling import BatchPlan

LOADERS = ("auto", "torch", "dali")


def _is_folder(source) -> bool:
    return all(hasattr(source, a) for a in ("paths", "labels", "root", "img_size", "seed", "crop_scale"))


def resolve_loader(kind: str, device: torch.device, source) -> str:
    """``torch`` or ``dali``. ``auto``: DALI when it is installed, the device is CUDA and the data is a
    folder; otherwise torch (DALI's CPU mode is opt-in: ``--loader dali`` on a CPU device).

    Raises DataError (CLI exit 2) for ``dali`` on built-in data, and DaliUnavailable (a DataError
    whose one-line message is the install command) for ``dali`` without DALI installed.
    """
    from .dali import dali_available, require_dali

    if kind not in LOADERS:
        raise DataError(f"--loader: {kind!r} is not one of {', '.join(LOADERS)}")
    if kind == "torch":
        return "torch"
    if kind == "dali":
        require_dali()
        if not _is_folder(source):
            raise DataError("--loader dali reads image folders (--data DIR); the built-in demo data is already "
                            "in memory: use --loader torch or auto")
        return "dali"
    return "dali" if _is_folder(source) and torch.device(device).type == "cuda" and dali_available() else "torch"


def folder_index(source, workers: int, cache_dir: Optional[str] = None, output_dir: str = ".") -> FileIndex:
    """The DALI file index of an image folder (cached under ``DATA/.fastebm_dali``, or
    ``OUTPUT_DIR/dali_cache`` when the data folder is read-only). Under torchrun, build it on one
    rank first (then barrier) so the others only read the cache."""
    return build_index(source.paths, cache_dir or default_cache_dir(source.root, output_dir), workers=max(1, workers))


def build_stream(kind: str, source, plan: BatchPlan, device: torch.device, num_workers: int = 0,
                 index: Optional[FileIndex] = None, output_dir: str = "."):
    """The micro-batch stream for ``--loader kind`` (``auto``/``torch``/``dali``).

    ``num_workers`` is the torch DataLoader's worker count or DALI's CPU thread count (at least 1).
    ``index`` (DALI only) is a prebuilt ``folder_index``; built here when None.
    """
    device = torch.device(device)
    if resolve_loader(kind, device, source) == "torch":
        return MicroBatchStream(source, plan, num_workers=num_workers, pin_memory=device.type == "cuda")
    from .dali import DaliMicroBatchStream

    if index is None:
        index = folder_index(source, num_workers, output_dir=output_dir)
    return DaliMicroBatchStream(source, plan, index, device, num_threads=max(1, num_workers))
