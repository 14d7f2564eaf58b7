"""Argument checks of the fused corruption ops, with errors that name the fix.

``validate_fused_inputs`` checks every argument of ``fastebm::fused_corrupt`` (dtype, device, rank,
channel count, permutation size, contiguity) and raises ``ValueError``. It runs on CPU and meta
tensors too (``require_cuda=False``), which is how it is tested on machines without a GPU.
``validate_philox_inputs`` does the same for ``fastebm::philox_words``.
"""
from __future__ import annotations

import torch

MAX_BATCH = 65535 * 64  # far above any real batch; keeps the grid arithmetic in range


def _fail(msg: str) -> None:
    raise ValueError(f"fused_corrupt: {msg}")


def validate_fused_inputs(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, *, patch_size, sr_factor,
                          key0=0, key1=0, offset=0, require_cuda=True, check_values=False) -> None:
    """Raise ValueError (naming the fix) unless the arguments are valid for the fused kernel.

    ``check_values`` also checks task ids and patch indices element-wise (synchronises the device).
    """
    tensors = dict(images=images, task_ids=task_ids, patch_src=patch_src, sample_ids=sample_ids, mean=mean, std=std,
                   noise_scale=noise_scale)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if images.dim() != 4:
        _fail(f"images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}; add a batch dimension with x[None]")
    if images.dtype not in (torch.uint8, torch.float32):
        _fail(f"images must be uint8 (0..255) or float32 ([0, 1]), got {images.dtype}; convert with .float()")
    b, c, h, w = images.shape
    if b < 1 or c < 1 or h < 1 or w < 1:
        _fail(f"images must be non-empty, got shape {tuple(images.shape)}")
    if b > MAX_BATCH:
        _fail(f"batch {b} exceeds {MAX_BATCH}; split it (pass sample_ids to keep the random stream)")
    if c * h * w >= 2**32 // 2:
        _fail(f"one image has {c * h * w} elements; the random stream supports fewer than 2**31")
    device = images.device
    if require_cuda and device.type != "cuda":
        _fail(f"images must be a CUDA tensor for the fused kernel (got {device}); use backend='reference' on CPU")
    for name, t in tensors.items():
        if t.device != device:
            _fail(f"{name} is on {t.device} but images are on {device}; move every input to one device")
        if not t.is_contiguous():
            _fail(f"{name} must be contiguous; call .contiguous() first")
    expect = dict(task_ids=(torch.int32, (b,), "sample"), sample_ids=(torch.int64, (b,), "sample"),
                  mean=(torch.float32, (c,), "channel"), std=(torch.float32, (c,), "channel"),
                  noise_scale=(torch.float32, (c,), "channel"))
    for name, (dtype, shape, per) in expect.items():
        t = tensors[name]
        if t.dtype != dtype:
            _fail(f"{name} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            _fail(f"{name} must have shape {shape} (one entry per {per}), "
                  f"got {tuple(t.shape)}; the images have B={b}, C={c}")
    if patch_src.dtype != torch.int32 or patch_src.dim() != 2 or patch_src.shape[0] != b:
        _fail(f"patch_src must be int32 of shape (B, P) = ({b}, P), got {patch_src.dtype} {tuple(patch_src.shape)}")
    if patch_size < 1:
        _fail(f"patch_size must be >= 1, got {patch_size}")
    n_patches = patch_src.shape[1]
    if n_patches:
        if h % patch_size or w % patch_size:
            _fail(f"image size {h}x{w} is not divisible by patch_size {patch_size}; crop or resize the images")
        expected = (h // patch_size) * (w // patch_size)
        if n_patches != expected:
            _fail(f"patch_src has {n_patches} entries per sample but a {h}x{w} image has {expected} patches of "
                  f"{patch_size}x{patch_size}; build it for this patch size")
    if sr_factor < 2:
        _fail(f"sr_factor must be >= 2, got {sr_factor}")
    for name, v in dict(key0=key0, key1=key1, offset=offset).items():
        if not 0 <= int(v) < 2**32:
            _fail(f"{name} must be in [0, 2**32), got {v}")
    if check_values and device.type != "meta":
        ids = task_ids.to("cpu")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 4):
            _fail("task_ids must be in 0..4 (mim, sort, sr, denoise, colorize)")
        uses_patches = bool(((ids == 0) | (ids == 1)).any())
        if uses_patches and n_patches == 0:
            _fail("a mim/sort sample needs patch_src of shape (B, P); got P = 0")
        if n_patches:
            src = patch_src.to("cpu")
            if int(src.min()) < -1 or int(src.max()) >= n_patches:
                _fail(f"patch_src values must be in [-1, {n_patches}) (-1 = masked patch)")
        sid = sample_ids.to("cpu")
        if int(sid.min()) < 0 or int(sid.max()) >= 2**32:
            _fail("sample_ids must be in [0, 2**32)")


def validate_philox_inputs(offset: int, sample_ids: torch.Tensor, n: int, purpose: int) -> None:
    """Raise ValueError (naming the fix) unless the arguments are valid for ``fastebm::philox_words``."""
    if not isinstance(sample_ids, torch.Tensor) or sample_ids.dtype != torch.int64 or sample_ids.dim() != 1:
        raise ValueError("philox_words: sample_ids must be a 1-D int64 tensor")
    if sample_ids.device.type != "cuda":
        raise ValueError(f"philox_words: sample_ids must be a CUDA tensor (got {sample_ids.device}); "
                         "use fastebm.corrupt.philox.philox_uint32 on CPU")
    for name, v in dict(offset=offset, purpose=purpose).items():
        if not 0 <= int(v) < 2**32:
            raise ValueError(f"philox_words: {name} must be in [0, 2**32), got {v}")
    if not 0 <= int(n) < 2**34:
        raise ValueError(f"philox_words: n must be in [0, 2**34), got {n}")
