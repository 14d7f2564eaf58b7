"""Public entry points: ``corrupt`` (one task on normalised images) and ``prepare_batch`` (the
training-loop call: uint8/float pixels -> clean target, corrupted input, loss weight, task ids)."""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping, Sequence

import torch

from . import _ext, philox
from .reference import SAMPLE_TASKS, TASK_ID, apply_plan, make_plan, normalise, num_kept

TASKS = SAMPLE_TASKS + ("mix",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PARAMS = {
    "mim": {"ratio": 0.6},
    "sort": {"ratio": 0.25},
    "sr": {"factor": 4},
    "denoise": {"sigma": 0.2},
    "colorize": {},
}
BACKENDS = ("auto", "reference", "cuda")


# ----------------------------------------------------------------------------------------------
# validation


def _check_task_name(name, allowed=TASKS) -> str:
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(allowed)}")
    return name


def _check_task_params(task: str, given: Mapping) -> dict:
    """Defaults of ``task`` updated with ``given``, every value checked."""
    if not isinstance(given, Mapping):
        raise ValueError(f"parameters of task {task!r} must be a dict, got {type(given).__name__}")
    allowed = DEFAULT_PARAMS[task]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"task {task!r} got unknown parameter(s) {unknown}; it accepts: {accepted}")
    out = {**allowed, **given}
    if task in ("mim", "sort"):
        ratio = out["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"{task} ratio must be a number strictly between 0 and 1, got {ratio!r}")
        out["ratio"] = float(ratio)
    elif task == "sr":
        factor = out["factor"]
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"sr factor must be an integer >= 2 (the down-sampling factor), got {factor!r}")
    elif task == "denoise":
        sigma = out["sigma"]
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"denoise sigma must be a finite number >= 0 (in [0, 1] pixel units), got {sigma!r}")
        out["sigma"] = float(sigma)
    return out


def _resolve_tasks(task_names: Sequence[str], params: Mapping) -> tuple[list[str], dict]:
    names = list(task_names)
    if not names:
        raise ValueError("the task list is empty; give at least one of " + ", ".join(SAMPLE_TASKS))
    for name in names:
        _check_task_name(name, SAMPLE_TASKS)
    unknown = sorted(set(params) - set(SAMPLE_TASKS))
    if unknown:
        raise ValueError(f"params given for unknown task(s) {unknown}; keys must be among {', '.join(SAMPLE_TASKS)}")
    checked = {t: _check_task_params(t, params.get(t, {})) for t in set(names)}
    return names, checked


def _check_images(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}; "
                         "add a batch dimension with x[None] (or x.unsqueeze(0))")
    if min(x.shape) < 1:
        raise ValueError(f"{what} must be non-empty, got shape {tuple(x.shape)}")


def _check_geometry(shape, names, params, patch_size) -> None:
    _, c, h, w = shape
    if "colorize" in names and c != 3:
        raise ValueError(f"colorize needs 3-channel RGB images, got C={c}; drop colorize for {c}-channel data")
    if "mim" in names or "sort" in names:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {patch_size} (needed by mim/sort); "
                             "crop/resize the images or choose a patch_size that divides both")
        n = (h // patch_size) * (w // patch_size)
        if "mim" in names and num_kept(params["mim"]["ratio"], n) < 1:
            raise ValueError(f"mim ratio {params['mim']['ratio']} masks no patch of {n}; raise the ratio or use "
                             "smaller patches")
        if "sort" in names and num_kept(params["sort"]["ratio"], n) < 2:
            raise ValueError(f"sort ratio {params['sort']['ratio']} selects fewer than 2 of {n} patches, so nothing "
                             "would move; raise the ratio or use smaller patches")


def _channel_stats(mean, std, channels, device, what="mean/std"):
    """(mean, std) as float32 (C,) tensors; None/None means no normalisation (0 and 1)."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is None:
        return (torch.zeros(channels, dtype=torch.float32, device=device),
                torch.ones(channels, dtype=torch.float32, device=device))
    try:  # the usual case, constant tuples: checked and copied to the device once
        return _channel_stats_cached(tuple(float(v) for v in mean), tuple(float(v) for v in std), channels, str(device))
    except TypeError:  # tensors with more than one dimension etc.: the general path
        pass
    return _channel_stats_checked(mean, std, channels, device)


@functools.lru_cache(maxsize=16)
def _channel_stats_cached(mean, std, channels, device):
    return _channel_stats_checked(mean, std, channels, device)


def _channel_stats_checked(mean, std, channels, device):
    out = []
    for name, v in (("mean", mean), ("std", std)):
        t = torch.as_tensor(v).detach().to("cpu", torch.float32).flatten()  # checked on the host: no device sync
        if t.numel() != channels:
            raise ValueError(f"{name} has {t.numel()} entries but the images have C={channels} channels; "
                             f"pass {channels} values (or mean=None, std=None for no normalisation)")
        out.append(t)
    if not bool((out[1] > 0).all()) or not bool(torch.isfinite(out[0]).all()) or not bool(torch.isfinite(out[1]).all()):
        raise ValueError("std must be positive and finite, mean finite")
    return out[0].to(device), out[1].to(device)


def _sample_ids(sample_ids, batch, device) -> torch.Tensor:
    if sample_ids is None:
        return torch.arange(batch, dtype=torch.int64, device=device)
    ids = torch.as_tensor(sample_ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or tuple(ids.shape) != (batch,):
        raise ValueError(f"sample_ids must be integers of shape ({batch},) (global index of each sample), "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    lo, hi = torch.aminmax(ids)  # on the host when the ids come from the host: no device sync
    if int(lo) < 0 or int(hi) >= 2**32:
        raise ValueError("sample_ids must be in [0, 2**32)")
    return ids.to(device).contiguous()


def _check_seed_offset(seed, offset) -> tuple[int, int]:
    out = []
    for name, v, bits in (("seed", seed, 64), ("offset", offset, 32)):
        try:  # ints, numpy and 0-dim torch integers
            iv = None if isinstance(v, bool) else operator.index(v)
        except TypeError:
            iv = None
        if iv is None or not 0 <= iv < 2**bits:
            raise ValueError(f"{name} must be an integer in [0, 2**{bits}), got {v!r}")
        out.append(iv)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# corrupt


def corrupt(x, task, seed=0, *, offset=0, sample_ids=None, patch_size=16, mean=None, std=None, in_chans=None,
            **params):
    """Corrupt a batch of normalised images with one pretext task; returns ``(corrupted, weight)``.

    Args:
        x: float tensor (B, C, H, W), normalised images (the clean target).
        task: ``mim`` (``ratio``=0.6), ``sort`` (``ratio``=0.25), ``sr`` (``factor``=4),
            ``denoise`` (``sigma``=0.2, [0, 1] pixel units), ``colorize`` or ``mix`` (``tasks``=list of
            task names, one drawn uniformly per sample; ``task_params``={name: {param: value}}).
        seed, offset: the random stream (e.g. run seed and training step); same values, same output.
        sample_ids: global index of each sample (default ``arange(B)``); a sample's corruption depends
            only on (seed, offset, sample id), never on the rest of the batch.
        patch_size: the unit of ``mim`` and ``sort`` (H and W must be divisible by it).
        mean, std: per-channel statistics used to normalise ``x``. When given, ``denoise`` noise is
            ``sigma / std_c`` per channel and ``colorize`` takes the luma in pixel space then normalises
            it again; when omitted, ``x`` is treated as pixel values.
        in_chans: if given, the channel count ``x`` must have.

    Returns:
        corrupted (same shape and dtype as ``x``) and weight (B, 1, H, W), the per-pixel loss weight
        (``mim``: 1 on masked patches only; every other task: 1 everywhere).
    See ``fastebm/corrupt/reference.py`` for the exact definition of each task.
    """
    _check_images(x, "x")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor of normalised images, got {x.dtype}; for uint8 pixels use "
                         "fastebm.corrupt.prepare_batch")
    b, c = x.shape[:2]
    if in_chans is not None and c != in_chans:
        raise ValueError(f"x has {c} channels but in_chans={in_chans}; pass images with {in_chans} channels")
    seed, offset = _check_seed_offset(seed, offset)
    _check_task_name(task)
    if task == "mix":
        unknown = sorted(set(params) - {"tasks", "task_params"})
        if unknown:
            raise ValueError(f"mix got unknown parameter(s) {unknown}; give tasks=[...] and per-task "
                             "task_params={'mim': {'ratio': 0.75}, ...}")
        sub = params.get("tasks", SAMPLE_TASKS)
        if isinstance(sub, str) or not isinstance(sub, Sequence):
            raise ValueError(f"mix tasks must be a list of task names, got {sub!r}")
        names, checked = _resolve_tasks(sub, params.get("task_params", {}) or {})
    else:
        names, checked = _resolve_tasks([task], {task: params})
    _check_geometry(x.shape, names, checked, patch_size)
    mean_t, std_t = _channel_stats(mean, std, c, x.device)
    ids = _sample_ids(sample_ids, b, x.device)
    plan = make_plan(x.shape, x.device, names, checked, seed=seed, offset=offset, sample_ids=ids,
                     patch_size=patch_size, std=std_t if std is not None else None)
    pixel = x
    if "colorize" in names and mean is not None:
        pixel = x * std_t.to(x.dtype).view(1, c, 1, 1) + mean_t.to(x.dtype).view(1, c, 1, 1)
    return apply_plan(x, pixel, plan, mean_t, std_t)


# ----------------------------------------------------------------------------------------------
# prepare_batch


def _prepare_tasks(tasks, params) -> tuple[list[str], dict]:
    params = dict(params or {})
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"tasks must be a task name or a non-empty list of names, got {tasks!r}")
    tasks = list(tasks)
    if "mix" in tasks:
        if len(tasks) != 1:
            raise ValueError("'mix' cannot be combined with other names; a list of names already mixes them")
        mix = params.pop("mix", {}) or {}
        tasks = list(mix.get("tasks", SAMPLE_TASKS))
    return _resolve_tasks(tasks, params)


def prepare_batch(images, tasks, *, seed, offset=0, sample_ids=None, patch_size=16, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, params=None, backend="auto"):
    """Normalise and corrupt a batch in one call; returns ``(clean, corrupted, weight, task_ids)``.

    Args:
        images: (B, C, H, W) uint8 in 0..255, or float in [0, 1] (converted to float32).
        tasks: a task name (that task for every sample) or a list of names (each sample draws one
            uniformly from the Philox stream; ``"mix"`` = all tasks, or ``params["mix"]["tasks"]``).
        seed, offset, sample_ids: the random stream (see ``corrupt``); ``offset`` is typically the
            training step and ``sample_ids`` the global index of each sample.
        patch_size: the unit of ``mim``/``sort``.
        mean, std: normalisation statistics (default ImageNet); ``None, None`` keeps [0, 1] pixels.
        params: per-task parameters, e.g. ``{"mim": {"ratio": 0.75}, "sr": {"factor": 2}}``.
        backend: ``"auto"`` (fused CUDA kernel for CUDA tensors when it builds, else the reference),
            ``"reference"`` (PyTorch) or ``"cuda"`` (the kernel, or an error).

    Returns:
        clean (B, C, H, W) float32 normalised target, corrupted (B, C, H, W) float32, weight
        (B, 1, H, W) float32, task_ids (B,) int64 indexing ``TASKS``. The kernel and the reference
        return bit-identical tensors.
    """
    _check_images(images, "images")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(f"images must be uint8 (0..255) or float ([0, 1]), got {images.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if images.dtype.is_floating_point and images.dtype != torch.float32:
        images = images.to(torch.float32)
    b, c = images.shape[:2]
    seed, offset = _check_seed_offset(seed, offset)
    names, checked = _prepare_tasks(tasks, params)
    _check_geometry(images.shape, names, checked, patch_size)
    device = images.device
    mean_t, std_t = _channel_stats(mean, std, c, device)
    ids = _sample_ids(sample_ids, b, device)

    use_cuda = backend == "cuda"
    if backend == "auto":
        if device.type != "cuda":
            _ext.note_reference_fallback(f"images are on {device.type}")
        elif _ext.load_extension():
            use_cuda = True
        else:
            _ext.note_reference_fallback("the CUDA extension is unavailable")
    if use_cuda and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got images on {device}; use backend='reference'")
    plan = make_plan(images.shape, device, names, checked, seed=seed, offset=offset, sample_ids=ids,
                     patch_size=patch_size, std=std_t if std is not None else None,
                     random_words=_ext.philox_words if use_cuda else philox.philox_uint32)
    if use_cuda:
        clean, corrupted, weight = _ext.fused_corrupt(
            images.contiguous(), plan.task_ids.to(torch.int32), plan.patch_src, plan.sample_ids, mean_t, std_t,
            plan.noise_scale, seed=seed, offset=offset, patch_size=patch_size, sr_factor=plan.sr_factor,
            check_values=False)
        return clean, corrupted, weight, plan.task_ids
    return (*prepare_batch_reference(images, plan, mean_t, std_t), plan.task_ids)


def pixels_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 [0, 1] by a true division by 255 (as the kernel); float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / torch.full((1,), 255.0, dtype=torch.float32, device=images.device)
    return images.to(torch.float32)


def prepare_batch_reference(images, plan, mean, std):
    """The PyTorch reference of the fused kernel: (clean, corrupted, weight) for a ready plan."""
    pixel = pixels_to_unit(images)
    clean = normalise(pixel, mean, std)
    corrupted, weight = apply_plan(clean, pixel, plan, mean, std)
    return clean, corrupted, weight


__all__ = ["corrupt", "prepare_batch", "prepare_batch_reference", "pixels_to_unit", "TASKS", "IMAGENET_MEAN",
           "IMAGENET_STD", "DEFAULT_PARAMS", "TASK_ID"]
