"""The pretext tasks in plain PyTorch: the specification the fused CUDA kernel reproduces bit for bit.

A corruption is computed in two stages:

1. ``make_plan`` draws every random *decision* from the Philox stream (``philox.py``): the task of
   each sample (``mix``), the masked patches (``mim``) and the patch permutation (``sort``). The
   result is a few small tensors (task id per sample, a source-patch index per patch, per-channel
   noise scales). The fused kernel receives exactly these tensors.
2. ``apply_plan`` turns (clean, pixel, plan) into (corrupted, weight), one task at a time.
   The Gaussian noise of ``denoise`` is drawn here, again from the Philox stream, element by element.

Per-task definitions (``clean`` = normalised image, ``pixel`` = the image in [0, 1] pixel units):

* ``mim``: ``K = floor(ratio * P + 1/2)`` of the ``P`` patches (those with the smallest Philox key,
  ties broken by patch index) are set to 0 (the dataset mean after normalisation). Weight: 1 on the
  masked patches, 0 elsewhere.
* ``sort``: the ``K`` patches chosen the same way are permuted among their own positions by one
  random cycle (patch ``order[i]`` receives patch ``order[i+1]``, the last the first), so every
  chosen patch moves and the multiset of patches is kept. Weight: 1 everywhere (the whole image
  must be put back in order).
* ``sr``: every pixel becomes the mean of its ``factor x factor`` block (block ``(h // f, w // f)``);
  blocks cut by the right/bottom border average only the pixels that exist. This is area
  down-sampling to ``ceil(H/f) x ceil(W/f)`` (``F.avg_pool2d(x, f, ceil_mode=True,
  count_include_pad=False)``) followed by nearest (block-replicating) up-sampling and cropping. The
  block sum runs row by row, left to right, in float32 from 0. Weight: 1.
* ``denoise``: ``clean + z * noise_scale[c]`` with ``z`` standard normal from the Philox stream
  (element order c, h, w of the sample) and ``noise_scale = sigma / std_c`` (``sigma`` in [0, 1]
  pixel units; ``sigma`` itself when no ``std`` is given). Weight: 1.
* ``colorize``: BT.601 luma ``Y = (0.299 R + 0.587 G) + 0.114 B`` of the pixel values, replicated on
  the three channels and normalised with each channel's mean/std. Weight: 1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import philox

SAMPLE_TASKS = ("mim", "sort", "sr", "denoise", "colorize")  # task id = index in this tuple
TASK_ID = {name: i for i, name in enumerate(SAMPLE_TASKS)}
LUMA_BT601 = (0.299, 0.587, 0.114)


@dataclass
class CorruptionPlan:
    """Every random decision of one corruption call; what the fused kernel receives."""

    task_ids: torch.Tensor  # (B,) int64, index into SAMPLE_TASKS
    patch_src: torch.Tensor  # (B, P) int32: source patch of each patch, -1 = masked; P = 0 if unused
    sample_ids: torch.Tensor  # (B,) int64, global sample index (Philox counter word 1)
    noise_scale: torch.Tensor  # (C,) float32, noise std per channel in normalised units
    seed: int
    offset: int
    patch_size: int
    sr_factor: int


def num_kept(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up (the number of patches a task selects)."""
    return int(ratio * n + 0.5)


@functools.lru_cache(maxsize=64)
def _task_table(task_names: tuple, device: str) -> torch.Tensor:
    """Task ids of the names as a device tensor, made once (avoids a host-to-device copy per call)."""
    return torch.tensor([TASK_ID[t] for t in task_names], dtype=torch.int64, device=device)


def choose_tasks(task_names, seed, offset, sample_ids, random_words=philox.philox_uint32) -> torch.Tensor:
    """Task id per sample: the only task, or a uniform choice among ``task_names`` (``mix``)."""
    ids = _task_table(tuple(task_names), str(sample_ids.device))
    if len(task_names) == 1:
        return ids.expand(sample_ids.numel()).clone()
    word = random_words(seed, offset, sample_ids, 1, philox.PURPOSE_TASK_CHOICE)[:, 0]
    choice = (word * len(task_names)) >> 32  # multiply-shift: uniform up to 2^-32 bias
    return ids[choice]


def make_plan(shape, device, task_names, params, *, seed, offset, sample_ids, patch_size, std=None,
              random_words=philox.philox_uint32) -> CorruptionPlan:
    """Draw the random decisions for a batch of ``shape`` (B, C, H, W). Inputs must be validated.

    ``random_words`` has the signature of ``philox.philox_uint32``; the CUDA path passes the
    one-launch kernel ``_ext.philox_words``, which returns the same words.
    """
    _, channels, height, width = shape
    task_ids = choose_tasks(task_names, seed, offset, sample_ids, random_words)
    batch = task_ids.numel()

    if "mim" in task_names or "sort" in task_names:
        n_patches = (height // patch_size) * (width // patch_size)
        keys = random_words(seed, offset, sample_ids, n_patches, philox.PURPOSE_PATCH_KEYS)
        order = torch.argsort(keys, dim=1, stable=True)  # random order of the patches of each sample
        identity = torch.arange(n_patches, device=device, dtype=torch.int64).expand(batch, n_patches)
        src = identity.clone()
        if "mim" in task_names:
            k = num_kept(params["mim"]["ratio"], n_patches)
            masked = identity.clone().scatter_(1, order[:, :k], -1)
            src = torch.where((task_ids == TASK_ID["mim"]).unsqueeze(1), masked, src)
        if "sort" in task_names:
            k = num_kept(params["sort"]["ratio"], n_patches)
            chosen = order[:, :k]
            cycled = identity.clone().scatter_(1, chosen, chosen.roll(-1, dims=1))
            src = torch.where((task_ids == TASK_ID["sort"]).unsqueeze(1), cycled, src)
        patch_src = src.to(torch.int32)
    else:
        patch_src = torch.empty((batch, 0), dtype=torch.int32, device=device)

    sigma = float(params["denoise"]["sigma"]) if "denoise" in task_names else 0.0
    sigma_t = torch.full((channels,), sigma, dtype=torch.float32, device=device)
    noise_scale = sigma_t / std.to(device=device, dtype=torch.float32) if std is not None else sigma_t
    sr_factor = int(params["sr"]["factor"]) if "sr" in task_names else 2
    return CorruptionPlan(task_ids, patch_src, sample_ids, noise_scale, int(seed), int(offset), int(patch_size), sr_factor)


# ----------------------------------------------------------------------------------------------
# Execution of a plan, one task at a time (readable; the kernel does all of it in one pass).


def _to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def _from_patches(patches: torch.Tensor, shape, p: int) -> torch.Tensor:
    b, c, h, w = shape
    return patches.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _mim(clean, patch_src, p):
    masked = patch_src < 0  # (b, P)
    patches = _to_patches(clean, p)
    corrupted = _from_patches(torch.where(masked.unsqueeze(-1), torch.zeros_like(patches), patches), clean.shape, p)
    weight = masked.to(clean.dtype).unsqueeze(-1).expand(-1, -1, p * p)
    return corrupted, _from_patches(weight, (clean.shape[0], 1) + clean.shape[2:], p)


def _sort(clean, patch_src, p):
    patches = _to_patches(clean, p)
    index = patch_src.to(torch.int64).unsqueeze(-1).expand_as(patches)
    return _from_patches(torch.gather(patches, 1, index), clean.shape, p)


def _sr(clean, f):
    b, c, h, w = clean.shape
    hb, wb = -(-h // f), -(-w // f)
    padded = torch.zeros((b, c, hb * f, wb * f), dtype=clean.dtype, device=clean.device)
    padded[:, :, :h, :w] = clean
    total = torch.zeros((b, c, hb, wb), dtype=clean.dtype, device=clean.device)
    for di in range(f):  # fixed summation order: row by row, left to right
        for dj in range(f):
            total = total + padded[:, :, di::f, dj::f]
    rows = (h - torch.arange(hb, device=clean.device) * f).clamp(max=f)
    cols = (w - torch.arange(wb, device=clean.device) * f).clamp(max=f)
    count = (rows.view(-1, 1) * cols.view(1, -1)).to(clean.dtype)  # exact small integers
    mean = total / count
    return mean.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)[:, :, :h, :w]


def _denoise(clean, noise_scale, seed, offset, sample_ids):
    b, c, h, w = clean.shape
    z = philox.philox_normal(seed, offset, sample_ids, c * h * w).view(b, c, h, w).to(clean.dtype)
    return clean + z * noise_scale.to(clean.dtype).view(1, c, 1, 1)


def luma(pixel: torch.Tensor) -> torch.Tensor:
    """BT.601 luma (B, 1, H, W) of RGB pixel values, summed as (R w_r + G w_g) + B w_b."""
    wr, wg, wb = (torch.tensor(v, dtype=pixel.dtype, device=pixel.device) for v in LUMA_BT601)
    return (pixel[:, 0:1] * wr + pixel[:, 1:2] * wg) + pixel[:, 2:3] * wb


def normalise(pixel, mean, std):
    """(pixel - mean_c) / std_c with (C,) tensors (a true division, as in the kernel)."""
    c = mean.numel()
    return (pixel - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)


def apply_plan(clean, pixel, plan: CorruptionPlan, mean, std):
    """Corrupt ``clean`` (B, C, H, W) following ``plan``; returns (corrupted, weight (B, 1, H, W)).

    ``pixel`` (same shape, [0, 1] units) feeds ``colorize`` (only read when that task occurs);
    ``mean``/``std`` are (C,) tensors used to normalise the grey image.
    """
    b, _, h, w = clean.shape
    corrupted = clean.clone()
    weight = torch.ones((b, 1, h, w), dtype=clean.dtype, device=clean.device)
    task_ids = plan.task_ids
    for name, tid in TASK_ID.items():
        rows = (task_ids == tid).nonzero().flatten()
        if rows.numel() == 0:
            continue
        x = clean.index_select(0, rows)
        if name == "mim":
            out, wgt = _mim(x, plan.patch_src.index_select(0, rows), plan.patch_size)
            weight.index_copy_(0, rows, wgt)
        elif name == "sort":
            out = _sort(x, plan.patch_src.index_select(0, rows), plan.patch_size)
        elif name == "sr":
            out = _sr(x, plan.sr_factor)
        elif name == "denoise":
            out = _denoise(x, plan.noise_scale, plan.seed, plan.offset, plan.sample_ids.index_select(0, rows))
        else:  # colorize
            grey = luma(pixel.index_select(0, rows))
            out = normalise(grey.expand(-1, clean.shape[1], -1, -1), mean.to(clean.dtype), std.to(clean.dtype))
        corrupted.index_copy_(0, rows, out)
    return corrupted, weight
