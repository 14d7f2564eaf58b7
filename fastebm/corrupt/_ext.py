"""The fused CUDA corruption kernel behind ``prepare_batch``: validate, load, call.

``fused_corrupt`` and ``philox_words`` check their arguments (:mod:`fastebm.corrupt._validate`),
make sure the CUDA implementation is loaded (:mod:`fastebm.corrupt._build`) and call the torch ops
``torch.ops.fastebm.fused_corrupt`` / ``philox_words`` (schemas: :mod:`fastebm.corrupt._schema`).
``load_extension``, ``extension_error`` and ``validate_fused_inputs`` are re-exported here for the
callers that ask whether the kernel is available.
"""
from __future__ import annotations

import logging

import torch

from . import _schema  # noqa: F401  (registers the op schemas and fake implementations)
from ._build import csrc_dir, extension_error, load_extension
from ._validate import MAX_BATCH, validate_fused_inputs, validate_philox_inputs

_log = logging.getLogger(__name__)
_said_reference = False

__all__ = ["fused_corrupt", "philox_words", "note_reference_fallback", "load_extension", "extension_error",
           "validate_fused_inputs", "csrc_dir", "MAX_BATCH"]


def note_reference_fallback(reason: str) -> None:
    """Say once, at DEBUG level, that the PyTorch reference does the corruption."""
    global _said_reference
    if not _said_reference:
        _said_reference = True
        _log.debug("fastebm.corrupt: using the PyTorch reference (%s)", reason)


def _require_extension() -> None:
    if not load_extension():
        raise RuntimeError(f"the fused CUDA corruption kernel could not be built: {extension_error()}")


def fused_corrupt(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, *, seed, offset, patch_size,
                  sr_factor, check_values=True):
    """Validate, then run the fused kernel: returns (clean, corrupted, weight)."""
    key0, key1 = int(seed) & 0xFFFFFFFF, int(seed) >> 32
    validate_fused_inputs(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, patch_size=patch_size,
                          sr_factor=sr_factor, key0=key0, key1=key1, offset=offset, check_values=check_values)
    _require_extension()
    return torch.ops.fastebm.fused_corrupt(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, key0, key1,
                                           int(offset), int(patch_size), int(sr_factor))


def philox_words(seed: int, offset: int, sample_ids: torch.Tensor, n: int, purpose: int) -> torch.Tensor:
    """``philox.philox_uint32`` computed by one CUDA kernel (same words, bit for bit)."""
    validate_philox_inputs(offset, sample_ids, n, purpose)
    _require_extension()
    return torch.ops.fastebm.philox_words(sample_ids.contiguous(), int(n), int(seed) & 0xFFFFFFFF, int(seed) >> 32,
                                          int(offset), int(purpose))
