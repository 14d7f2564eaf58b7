"""Gradient descent on the energy for whole images of any size, tile by tile, batched.

One step on an image ``x`` larger than the model is ``x <- x - alpha_t * blend_k(dE/dx(tile_k(x)))``:
the energy gradient of every tile (a model-sized crop) is blended back with the window of
:mod:`fastebm.tools.tiling`, so each step moves every pixel by the weighted mean of the gradients
of the tiles that cover it, and the next step's tiles see the blended image (tiles stay
consistent with each other, unlike restoring each tile on its own and pasting the results). An
image exactly the model's size is one tile, and the descent is then exactly
``RestorationObjective.restore`` (tested). The energy of an image is the mean of its tiles' energies.

Step sizes: step ``t < T`` uses the checkpoint's learned ``alpha_t = softplus(a_t)``; a descent run
longer than the ``T`` trained steps keeps using the last learned step size ``alpha_{T-1}`` (the
model never saw those steps; the last step size is the one tuned for an already partly restored
image). Langevin noise (``noise_sigma`` of the objective, off by default) is drawn from a seeded
generator so runs are reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import ToolInputError
from .tiling import TileLayout


def model_geometry(objective) -> Tuple[Tuple[int, int], int]:
    """((th, tw), patch_size) of the objective's model: its input size and its patch side."""
    model = objective.model
    size = getattr(model, "img_size", None)
    if size is None:
        raise ToolInputError("the model has no img_size attribute; the tools need a fixed-size energy model")
    th, tw = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return (th, tw), int(getattr(model, "patch_size", 1))


def step_sizes(objective, steps: int) -> torch.Tensor:
    """(steps,) float32 step sizes: the learned ``alpha_t`` for t < T, then ``alpha_{T-1}`` repeated."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ToolInputError(f"steps must be an integer >= 1 (number of descent steps), got {steps!r}")
    alphas = objective.alphas.detach()
    index = torch.arange(steps).clamp(max=alphas.numel() - 1).to(alphas.device)
    return alphas[index]


def default_overlap(tile: Tuple[int, int], unit: int) -> int:
    """A quarter of the smaller tile side, rounded to a multiple of ``unit`` and below the tile side."""
    side = min(tile)
    overlap = int(round(side / 4 / unit)) * unit
    return max(0, min(overlap, side - unit))


def check_overlap(overlap: int, tile: Tuple[int, int], unit: int) -> int:
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < min(tile) or overlap % unit:
        raise ToolInputError(f"--overlap must be a multiple of {unit} px in [0, {min(tile)}) for this model and task "
                             f"(tiles of {tile[0]}x{tile[1]} px), got {overlap!r}")
    return overlap


def resize_pixels(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, h, w), bilinear with antialiasing (the model's input size)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def padded_size(height: int, width: int, tile: Tuple[int, int], unit: int) -> Tuple[int, int]:
    """The smallest (H', W') >= the image and the tile whose sides are multiples of ``unit``."""
    return (max(tile[0], math.ceil(height / unit) * unit), max(tile[1], math.ceil(width / unit) * unit))


def pad_pixels(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, H', W') by repeating the last row/column (bottom/right; cropped off afterwards)."""
    dh, dw = size[0] - image.shape[-2], size[1] - image.shape[-1]
    if dh == 0 and dw == 0:
        return image
    return F.pad(image[None].float(), (0, dw, 0, dh), mode="replicate")[0].to(torch.uint8)


@dataclass
class Trajectory:
    """The descent of one image: ``xs`` = [x_0 .. x_N] (C, H, W) and the energy of each (N + 1 floats)."""

    xs: List[torch.Tensor]
    energies: List[float]


def _energies_and_grads(objective, tiles: torch.Tensor, with_grad: bool, batch_size: int):
    energies, grads = [], []
    for chunk in tiles.split(batch_size):
        if with_grad:
            with torch.enable_grad():
                energy, grad = objective.energy_and_grad(chunk.detach().requires_grad_(True), create_graph=False)
            grads.append(grad.detach())
        else:
            with torch.no_grad():
                energy = objective.model(chunk)
        energies.append(energy.detach().double())
    return torch.cat(energies), (torch.cat(grads) if with_grad else None)


def descend(objective, images: Sequence[torch.Tensor], layouts: Sequence[TileLayout], steps: int, *,
            batch_size: int = 64, generator: Optional[torch.Generator] = None) -> List[Trajectory]:
    """``steps`` energy-descent steps on each normalised image (C, H, W), all images' tiles batched together.

    Args:
        objective: a :class:`~fastebm.RestorationObjective` (its ``model``, ``alphas``, ``noise_sigma``).
        images: normalised float images (C, H_i, W_i) on the objective's device, any sizes
            (each at least the model's size; see :func:`pad_pixels`).
        layouts: one :class:`TileLayout` per image (:func:`~fastebm.tools.tiling.plan_tiles`).
        steps: number of descent steps N >= 0 (0: energies only).
        batch_size: tiles per model call.
        generator: CPU generator for the optional Langevin noise.

    Returns:
        one :class:`Trajectory` per image: N + 1 images (same shape as the input, normalised units)
        and N + 1 energies (the model's units; mean over the image's tiles).
    """
    alphas = step_sizes(objective, steps) if steps > 0 else None
    current = list(images)
    out = [Trajectory([x], []) for x in images]
    sigma = float(getattr(objective, "noise_sigma", 0.0) or 0.0)
    for t in range(steps + 1):
        with_grad = t < steps
        tiles = [layout.extract(x) for x, layout in zip(current, layouts)]
        counts = [len(tl) for tl in tiles]
        energy, grad = _energies_and_grads(objective, torch.cat(tiles), with_grad, batch_size)
        grads = grad.split(counts) if with_grad else [None] * len(counts)
        for i, (e, g) in enumerate(zip(energy.split(counts), grads)):
            out[i].energies.append(float(e.mean()))
            if not with_grad:
                continue
            blended = layouts[i].blend(g)
            x = current[i] - alphas[t].to(blended.dtype) * blended
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            current[i] = x
            out[i].xs.append(x)
    return out
