"""What the energy model restores: corrupt images, descend the energy, measure PSNR and SSIM.

``restore_images`` corrupts each image with one pretext task (deterministically: Philox stream keyed
by (seed, image index), as in training; ``fastebm.corrupt``), restores it by ``N`` energy-descent
steps (:mod:`fastebm.tools.descent`: tile by tile at the model's resolution, or after resizing to
it) and compares clean, corrupted and restored images in [0, 1] pixel space (ImageNet
normalisation undone, clamped):

* PSNR = 10 log10(1 / MSE) over the task's weighted region (the masked patches for ``mim``, every
  pixel otherwise), computed by ``fastebm.eval.psnr.region_psnr``, the function behind the
  training-time PSNR gain;
* SSIM over the whole image, scikit-image's ``structural_similarity`` (Wang et al. 2004; uniform
  7x7 window, data range 1, averaged over the RGB channels).

An image that the task leaves unchanged (``colorize`` on a grey image) has no corrupted PSNR
(``None``; it would be infinite). With ``already_corrupted=True`` the images are restored as given
(a real noisy or grey photo): no clean reference, so trajectories and energies only.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..corrupt import DEFAULT_PARAMS, IMAGENET_MEAN, IMAGENET_STD, pixels_to_unit, prepare_batch
from ..corrupt.reference import normalise
from ..data.folder import UnreadableImage
from ..eval.psnr import region_psnr, to_unit_range
from .descent import (check_overlap, default_overlap, descend, model_geometry, pad_pixels, padded_size,
                      resize_pixels, step_sizes)
from .errors import ToolInputError
from .inputs import ImageItem
from .tiling import TileLayout, plan_tiles

TASKS = ("mim", "sort", "sr", "denoise", "colorize")
UNCHANGED_TOL = 0.5 / 255  # max |corrupted - clean| below which a task changed nothing (as in eval.psnr)


@dataclass
class RestorationResult:
    """One restored image; every image tensor is float32 (C, H, W) in [0, 1] pixels, on the CPU.

    ``steps`` holds x_1 .. x_N (``restored`` is x_N); ``energies`` the energy of x_0 .. x_N (N + 1
    floats, the model's units; the mean over the image's tiles). ``clean``, ``weight`` (1, H, W; the
    PSNR region) and the PSNR (dB) / SSIM (in [-1, 1]) fields are None without a clean reference;
    ``psnr_steps`` is the PSNR after each step (``psnr_steps[-1] == psnr_restored``).
    ``size`` is (H, W) of the result, ``source_size`` that of the input (they differ with ``resize``).
    """

    index: int
    name: str
    task: Optional[str]
    size: Tuple[int, int]
    source_size: Tuple[int, int]
    tiles: int
    corrupted: torch.Tensor
    steps: List[torch.Tensor]
    energies: List[float]
    clean: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    psnr_corrupted: Optional[float] = None
    psnr_restored: Optional[float] = None
    ssim_corrupted: Optional[float] = None
    ssim_restored: Optional[float] = None
    psnr_steps: Optional[List[float]] = None

    @property
    def restored(self) -> torch.Tensor:
        return self.steps[-1]

    @property
    def psnr_gain(self) -> Optional[float]:
        if self.psnr_corrupted is None or self.psnr_restored is None:
            return None
        return self.psnr_restored - self.psnr_corrupted


def task_params(task: str, mask_ratio: Optional[float] = None, sr_factor: Optional[int] = None,
                sigma: Optional[float] = None) -> Dict[str, Dict]:
    """``prepare_batch`` parameters of ``task``, every one with its effective value: the given one, or
    for None the training default (``fastebm.corrupt.DEFAULT_PARAMS``: mim ratio 0.6, sort ratio 0.25,
    sr factor 4, denoise sigma 0.2; colorize has none). Parameters of other tasks are ignored here
    (the CLI refuses them)."""
    given = {"mim": {"ratio": mask_ratio}, "sr": {"factor": sr_factor}, "denoise": {"sigma": sigma}}.get(task, {})
    return {task: {**DEFAULT_PARAMS.get(task, {}), **{k: v for k, v in given.items() if v is not None}}}


def check_task(objective, task: str, params: Dict[str, Dict]) -> int:
    """Checks that ``task`` with ``params`` fits the model's tiles; returns the tiling unit in px.

    The unit (patch side for mim/sort, the factor for sr, else 1) is what tile positions and padding
    are multiples of, so masks, shuffled patches and sr blocks line up with every tile's patch grid.
    """
    if task not in TASKS:
        raise ToolInputError(f"--task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    tile, patch = model_geometry(objective)
    if task == "sr":
        factor = params.get("sr", {}).get("factor", 4)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ToolInputError(f"--sr_factor must be an integer >= 2, got {factor!r}")
        if tile[0] % factor or tile[1] % factor:
            raise ToolInputError(f"--sr_factor {factor} does not divide the model's input size {tile[0]}x{tile[1]}; "
                                 f"use a factor that divides {math.gcd(*tile)}")
    try:
        prepare_batch(torch.zeros((1, 3) + tile, dtype=torch.uint8), [task], seed=0, patch_size=patch,
                      params=params, backend="reference")
    except ValueError as exc:
        raise ToolInputError(f"--task {task} on the model's {tile[0]}x{tile[1]} input: {exc}") from None
    return {"mim": patch, "sort": patch, "sr": params.get("sr", {}).get("factor", 4)}.get(task, 1)


def effective_overlap(objective, task: Optional[str], params: Dict[str, Dict], overlap: Optional[int] = None) -> int:
    """The tile overlap in px a restoration with ``task`` (None: already corrupted) uses: ``overlap``
    checked, or the default (a quarter of the tile, a multiple of the tiling unit). Raises
    ToolInputError for a task that does not fit the model or a bad overlap."""
    tile = model_geometry(objective)[0]
    unit = _tiling_unit(objective, task, params)
    return default_overlap(tile, unit) if overlap is None else check_overlap(overlap, tile, unit)


def _tiling_unit(objective, task: Optional[str], params: Dict[str, Dict]) -> int:
    """What tile positions and padding are multiples of: the task's unit and the model's patch side."""
    unit = check_task(objective, task, params) if task is not None else 1
    patch = model_geometry(objective)[1]
    return unit * patch // math.gcd(unit, patch)  # keep tiles on the model's patch grid too


def _as_uint8(image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):  # a PIL image
        from ..data.transforms import pil_to_uint8

        return pil_to_uint8(image)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ToolInputError(f"an image tensor must be (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        if not image.dtype.is_floating_point:
            raise ToolInputError(f"image tensors must be uint8 (0..255) or float in [0, 1], got {image.dtype}")
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def as_items(images, img_size: int) -> List[ImageItem]:
    """uint8/float tensors (N, C, H, W) or (C, H, W), PIL images, paths/folders/``builtin:NAME`` or
    ImageItems, one or a sequence of them -> ImageItems (``img_size``: the side of the built-in sets)."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.dim() == 4 else [images]
    elif isinstance(images, (str, os.PathLike, ImageItem)) or not hasattr(images, "__iter__"):
        images = [images]  # one path, folder or PIL image (a string must not be iterated per character)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, ImageItem):
            out.append(image)
        elif isinstance(image, (str, os.PathLike)):
            from .inputs import collect_images

            out += collect_images([os.fspath(image)], img_size=img_size)
        else:
            out.append(ImageItem(f"image[{i}]", (lambda im=image: _as_uint8(im))))
    if not out:
        raise ToolInputError("no images given")
    return out


@dataclass
class _Prepared:
    index: int
    name: str
    source_size: Tuple[int, int]
    size: Tuple[int, int]
    layout: TileLayout
    corrupted: torch.Tensor  # normalised (3, H', W') on the device
    clean: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]


def _prepare(index, item, objective, task, params, unit, overlap, resize, seed, device) -> _Prepared:
    tile, patch = model_geometry(objective)
    pixels = _as_uint8(item.load())
    source_size = tuple(pixels.shape[-2:])
    if resize:
        pixels = resize_pixels(pixels, tile)
    h, w = pixels.shape[-2:]
    padded = pad_pixels(pixels, padded_size(h, w, tile, unit)).to(device)
    if task is None:
        mean = torch.tensor(IMAGENET_MEAN, device=device)
        std = torch.tensor(IMAGENET_STD, device=device)
        clean, weight, corrupted = None, None, normalise(pixels_to_unit(padded[None]), mean, std)[0]
    else:
        clean, corrupted, weight, _ = prepare_batch(padded[None], [task], seed=seed, offset=0,
                                                    sample_ids=torch.tensor([index]), patch_size=patch, params=params)
        clean, corrupted, weight = clean[0], corrupted[0], weight[0]
    layout = plan_tiles(padded.shape[-2], padded.shape[-1], tile, overlap)
    return _Prepared(index, item.name, source_size, (h, w), layout, corrupted, clean, weight)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    """SSIM of two (3, H, W) [0, 1] images by scikit-image (7x7 window, smaller for tiny images)."""
    from skimage.metrics import structural_similarity

    side = min(x.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return None
    a = x.permute(1, 2, 0).double().numpy()
    b = ref.permute(1, 2, 0).double().numpy()
    return float(structural_similarity(b, a, channel_axis=2, data_range=1.0, win_size=win))


def _finish(p: _Prepared, xs, energies, task) -> RestorationResult:
    h, w = p.size
    crop = [to_unit_range(x[None, :, :h, :w])[0].cpu() for x in xs]
    result = RestorationResult(p.index, p.name, task, (h, w), p.source_size, p.layout.count, crop[0], crop[1:],
                               list(energies))
    if p.clean is None:
        return result
    clean = to_unit_range(p.clean[None, :, :h, :w])[0].cpu()
    weight = p.weight[:, :h, :w].cpu()
    result.clean, result.weight = clean, weight
    changed = float((result.corrupted - clean).abs().max()) > UNCHANGED_TOL
    if changed and float(weight.sum()) > 0:
        result.psnr_corrupted = float(region_psnr(result.corrupted[None], clean[None], weight[None])[0])
    if float(weight.sum()) > 0:
        steps = torch.stack(result.steps)
        result.psnr_steps = region_psnr(steps, clean.expand_as(steps), weight.expand(len(steps), -1, -1, -1)).tolist()
        result.psnr_restored = result.psnr_steps[-1]
    result.ssim_corrupted = ssim(result.corrupted, clean)
    result.ssim_restored = ssim(result.restored, clean)
    return result


def _warn_skip(name: str, reason: str) -> None:
    warnings.warn(f"skipped unreadable image {name}: {reason}", stacklevel=3)


def iter_restorations(objective, items: Sequence[ImageItem], task: Optional[str] = "denoise", *,
                      steps: Optional[int] = None, params: Optional[Dict[str, Dict]] = None, seed: int = 0,
                      resize: bool = False, overlap: Optional[int] = None, batch_size: int = 64,
                      on_skip: Callable[[str, str], None] = _warn_skip, progress: bool = False) -> Iterator[RestorationResult]:
    """Generator behind :func:`restore_images` (same arguments; ``task=None`` = already corrupted).

    Yields results in input order while processing images in groups of about ``batch_size`` tiles;
    unreadable files are reported through ``on_skip(name, reason)`` and skipped.
    """
    from tqdm.auto import tqdm

    steps = objective.steps if steps is None else steps
    step_sizes(objective, steps)  # validates steps
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ToolInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    params = params or (task_params(task) if task else {})
    unit = _tiling_unit(objective, task, params)
    tile = model_geometry(objective)[0]
    overlap = default_overlap(tile, unit) if overlap is None else check_overlap(overlap, tile, unit)
    device = next(objective.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = objective.training
    objective.eval()
    bar = tqdm(total=len(items), unit="img", disable=None if progress else True, leave=False)
    try:
        group: List[_Prepared] = []
        for index, item in enumerate(items):
            try:
                group.append(_prepare(index, item, objective, task, params, unit, overlap, resize, seed, device))
            except UnreadableImage as exc:
                on_skip(item.name, exc.reason)
                bar.update(1)
            if group and (sum(p.layout.count for p in group) >= batch_size or index == len(items) - 1):
                trajectories = descend(objective, [p.corrupted for p in group], [p.layout for p in group], steps,
                                       batch_size=batch_size, generator=generator)
                for p, traj in zip(group, trajectories):
                    yield _finish(p, traj.xs, traj.energies, task)
                bar.update(len(group))
                group = []
    finally:
        bar.close()
        objective.train(was_training)


def restore_images(model, images, task: Optional[str] = "denoise", *, steps: Optional[int] = None,
                   mask_ratio: Optional[float] = None, sr_factor: Optional[int] = None, sigma: Optional[float] = None,
                   seed: int = 0, already_corrupted: bool = False, resize: bool = False,
                   overlap: Optional[int] = None, batch_size: int = 64, device=None,
                   progress: bool = False) -> List[RestorationResult]:
    """Corrupts and restores images with an energy model; see the module docstring for the metrics.

    Args:
        model: a :class:`~fastebm.RestorationObjective` or the path of a ``fastebm-train`` checkpoint
            (``last.pt``; loaded onto ``device``).
        images: uint8 (N, 3, H, W) / (3, H, W) tensors (float in [0, 1] is quantised to 8 bits), PIL
            images, image paths or folders; any sizes and aspect ratios.
        task: ``mim``, ``sort``, ``sr``, ``denoise`` or ``colorize``; ignored when ``already_corrupted``.
        steps: descent steps N (default: the checkpoint's T; beyond T the last learned step size is reused).
        mask_ratio, sr_factor, sigma: task parameters (defaults as in training: 0.6, 4, 0.2 in [0, 1]
            pixel units).
        seed: the corruption stream (image ``i`` gets the sample id ``i``).
        already_corrupted: restore the images as given (no corruption, no clean reference).
        resize: resize each image to the model's resolution (bilinear, antialiased) instead of
            restoring it tile by tile at its own size.
        overlap: tile overlap in px (default a quarter of the tile, a multiple of the patch side).
        batch_size: tiles per model call; device: where a checkpoint is loaded (default cuda if visible).

    Returns:
        one :class:`RestorationResult` per readable image (unreadable files are skipped with a warning).
    Raises:
        ToolInputError: bad checkpoint, task that does not fit the model (e.g. an sr factor that does
            not divide its size), ``steps < 1``, bad overlap, no images.
    """
    objective = _objective(model, device)
    params = {} if already_corrupted else task_params(task, mask_ratio, sr_factor, sigma)
    items = as_items(images, model_geometry(objective)[0][0])
    return list(iter_restorations(objective, items, None if already_corrupted else task, steps=steps,
                                  params=params, seed=seed, resize=resize, overlap=overlap, batch_size=batch_size,
                                  progress=progress))


def resolve_device(name=None) -> torch.device:
    """``None``/``"auto"`` -> cuda if visible else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` checked."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ToolInputError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolInputError(f"--device {name}: no CUDA GPU is visible; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ToolInputError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def _objective(model, device):
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_objective

        return load_objective(model, resolve_device(device))[0]
    if device is not None:
        model = model.to(resolve_device(device))
    return model


SUMMARY_KEYS = ("psnr_corrupted", "psnr_restored", "ssim_corrupted", "ssim_restored")


# Why an image is left out of the means (``summarise``'s ``left_out`` keys) -> how to say it of n images.
LEFT_OUT = {
    "no_reference": "{n} image{s} without a clean reference",
    "empty_region": "{n} image{s} without pixels in the task's region",
    "grey": "{n} grey image{s} with nothing to colorize",
    "unchanged": "{n} image{s} the task left unchanged",
    "no_ssim": "{n} image{s} under 3 px on a side (no SSIM)",
}


def left_out_reason(m: Dict) -> Optional[str]:
    """Why an image (its metrics as a dict, with ``task``) is not in the means (a :data:`LEFT_OUT`
    key), or None."""
    if m.get("psnr_restored") is None:
        return "no_reference" if m.get("task") in (None, "already_corrupted") else "empty_region"
    if m.get("psnr_corrupted") is None:
        return "grey" if m.get("task") == "colorize" else "unchanged"
    if m.get("ssim_corrupted") is None or m.get("ssim_restored") is None:
        return "no_ssim"
    return None


def left_out_text(left_out: Dict[str, int]) -> str:
    """``1 grey image with nothing to colorize, 2 images ...`` for ``summarise``'s ``left_out``."""
    return ", ".join(LEFT_OUT[k].format(n=n, s="" if n == 1 else "s") for k, n in left_out.items())


def summarise(results: Iterable) -> Dict:
    """Means over images of PSNR (corrupted, restored, gain) and SSIM (corrupted, restored).

    ``results``: RestorationResults or dicts with the keys ``psnr_corrupted``, ``psnr_restored``,
    ``ssim_corrupted``, ``ssim_restored`` (None where missing) and optionally ``task``. Every mean
    is over the same images: those that have all four metrics (``images_in_mean`` of ``images``);
    ``left_out`` counts the others per reason (a :data:`LEFT_OUT` key: e.g. ``grey``, a grey image
    under ``colorize`` has no corrupted PSNR; ``no_ssim``, an image under 3 px has no SSIM). A mean is None when no
    image has every metric. ``images_with_psnr`` counts the images that have both PSNRs.
    """
    values = {k: [] for k in SUMMARY_KEYS + ("psnr_gain",)}
    left_out: Dict[str, int] = {}
    total = with_psnr = 0
    for r in results:
        m = dict(r) if isinstance(r, dict) else {k: getattr(r, k) for k in SUMMARY_KEYS + ("task",)}
        total += 1
        with_psnr += m["psnr_corrupted"] is not None and m["psnr_restored"] is not None
        reason = left_out_reason(m)
        if reason is not None:
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        for k in SUMMARY_KEYS:
            values[k].append(m[k])
        values["psnr_gain"].append(m["psnr_restored"] - m["psnr_corrupted"])
    out: Dict = {k: (float(np.mean(v)) if v else None) for k, v in values.items()}
    out.update(images=total, images_in_mean=len(values["psnr_gain"]), images_with_psnr=with_psnr, left_out=left_out)
    return out
