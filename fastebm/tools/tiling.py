"""Images of any size through a fixed-size model: overlapping tiles blended with a smooth window.

A ``(H, W)`` image (``H >= th``, ``W >= tw``) is covered by tiles of the model's size ``(th, tw)``
placed every ``stride = tile - overlap`` pixels, the last row/column of tiles flush with the
bottom/right border. A per-tile result (e.g. ``dE/dx`` of that tile) is put back as

    out(p) = sum_k w_k(p) r_k(p) / sum_k w_k(p)

with ``w_k`` the tile window at ``p``'s position in tile ``k``. The window is 1 in the tile's interior
and rises as ``sin^2`` over the ``overlap`` pixels at each border, never reaching 0 (samples at
half-pixel offsets), so every pixel has a positive weight. Two neighbours at the nominal stride
have ramps that sum to exactly 1 (``sin^2 + cos^2``); the last, flush tile overlaps more, which
the normalisation absorbs. Because the weights are normalised per pixel, a result that is the same
in every tile (a constant image) comes back unchanged, and any result is a convex combination of
the tiles' values at that pixel: blending cannot create values outside them, only smooth the
transition between tiles over the overlap (what "no seams" means here; tests/test_restore_tool.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch


def tile_starts(length: int, tile: int, stride: int) -> List[int]:
    """Start offsets of tiles of side ``tile`` every ``stride`` px over ``length`` px, the last flush with the end."""
    if length < tile:
        raise ValueError(f"image side {length} px is smaller than the tile ({tile} px); pad it first")
    if stride < 1:
        raise ValueError(f"tile stride must be >= 1 px, got {stride}")
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def ramp_window(tile: int, overlap: int) -> torch.Tensor:
    """1-D float64 window of length ``tile``: ``sin^2`` ramps over ``overlap`` px at both ends, 1 between."""
    w = torch.ones(tile, dtype=torch.float64)
    if overlap > 0:
        i = torch.arange(overlap, dtype=torch.float64)
        ramp = torch.sin(0.5 * math.pi * (i + 0.5) / overlap).pow(2)
        w[:overlap] = ramp
        w[tile - overlap:] = torch.minimum(w[tile - overlap:], ramp.flip(0))
    return w


@dataclass
class TileLayout:
    """Where the tiles of one (padded) image lie, and the per-pixel blending weights.

    ``starts`` holds (top, left) per tile; ``window`` (th, tw) and ``norm`` (H, W) are float32
    (``norm`` is the sum of the windows covering each pixel, > 0 everywhere).
    """

    height: int
    width: int
    tile: Tuple[int, int]
    starts: List[Tuple[int, int]]
    window: torch.Tensor
    norm: torch.Tensor

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def single(self) -> bool:
        """One tile covering the whole image: the model sees the image itself (no blending)."""
        return self.count == 1

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) image -> (count, C, th, tw) tiles."""
        th, tw = self.tile
        if self.single:
            return x.unsqueeze(0)
        return torch.stack([x[:, t:t + th, l:l + tw] for t, l in self.starts])

    def blend(self, tiles: torch.Tensor) -> torch.Tensor:
        """(count, C, th, tw) per-tile results -> (C, H, W), window-weighted and normalised per pixel."""
        if tiles.shape[0] != self.count:
            raise ValueError(f"expected {self.count} tiles, got {tiles.shape[0]}")
        if self.single:
            return tiles[0]
        th, tw = self.tile
        window = self.window.to(device=tiles.device, dtype=tiles.dtype)
        out = torch.zeros((tiles.shape[1], self.height, self.width), dtype=tiles.dtype, device=tiles.device)
        weighted = tiles * window
        for k, (t, l) in enumerate(self.starts):
            out[:, t:t + th, l:l + tw] += weighted[k]
        return out / self.norm.to(device=tiles.device, dtype=tiles.dtype)


def plan_tiles(height: int, width: int, tile: Tuple[int, int], overlap: int) -> TileLayout:
    """Tiles of size ``tile`` = (th, tw) with ``overlap`` px between neighbours over an (H, W) image.

    ``overlap`` must be in ``[0, min(th, tw))``; ``H >= th`` and ``W >= tw`` (pad smaller images).
    """
    th, tw = tile
    if not 0 <= overlap < min(th, tw):
        raise ValueError(f"tile overlap must be in [0, {min(th, tw)}) px, got {overlap}")
    rows = tile_starts(height, th, th - overlap)
    cols = tile_starts(width, tw, tw - overlap)
    starts = [(t, l) for t in rows for l in cols]
    window = torch.outer(ramp_window(th, overlap), ramp_window(tw, overlap))
    norm = torch.zeros((height, width), dtype=torch.float64)
    for t, l in starts:
        norm[t:t + th, l:l + tw] += window
    return TileLayout(height, width, (th, tw), starts, window.float(), norm.float())
