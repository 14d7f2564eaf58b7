"""Energy heads: a scalar energy per image from the last block's tokens.

``sqnorm`` (default) is ``E = mean_i 1/2 ||h_i||^2`` over all output tokens *before* the final
norm: with LayerNorm's initial affine (gamma 1, beta 0) every normed token has squared norm D, so
the post-norm version is constant at initialisation and gives no restoration signal until the norm's
affine moves (docs/design.md §2). ``sqnorm_post`` and ``linear`` are the alternatives.

Each head has ``forward(h, norm) -> E`` and, beside it, ``energy_and_grad(h, norm) -> (E, dE/dh)``
written with forward ops (:mod:`fastebm.ops.vjp`) for the explicit engine; ``h`` is (B, N, D), ``E``
is (B,), ``dE/dh`` is the gradient of ``E.sum()`` (float32 for half-precision tokens).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from .ops.vjp import layer_norm_bwd, layer_norm_fwd

Tensor = torch.Tensor

ENERGIES = ("sqnorm", "sqnorm_post", "linear")


def _half_sqnorm(h: Tensor) -> Tensor:
    # mean over tokens of 1/2 ||h_i||^2, per sample
    return 0.5 * h.pow(2).sum(-1).mean(-1)


class SqNormEnergy(nn.Module):
    def __init__(self, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm

    def forward(self, h: Tensor, norm: nn.Module) -> Tensor:
        if self.post_norm:
            h = norm(h)
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()  # the energy is a large sum: accumulate half-precision tokens in fp32
        return _half_sqnorm(h)

    def energy_and_grad(self, h: Tensor, norm: nn.LayerNorm) -> Tuple[Tensor, Tensor]:
        n_tok = h.shape[1]
        if not self.post_norm:
            hf = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
            return _half_sqnorm(hf), hf / n_tok
        z, cache = layer_norm_fwd(h, norm)
        return _half_sqnorm(z), layer_norm_bwd(z / n_tok, cache)


class LinearEnergy(nn.Module):
    """A learned projection of the mean normed token (training-only: ``energy_head.proj``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.normal_(self.proj.weight, std=dim ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor, norm: nn.Module) -> Tensor:
        return self.proj(norm(h).mean(1)).squeeze(-1)

    def energy_and_grad(self, h: Tensor, norm: nn.LayerNorm) -> Tuple[Tensor, Tensor]:
        z, cache = layer_norm_fwd(h, norm)
        w = self.proj.weight.reshape(1, 1, -1).to(z.dtype)
        return self.proj(z.mean(1)).squeeze(-1), layer_norm_bwd((w / h.shape[1]).expand_as(z), cache)


def build_energy_head(name: str, dim: int) -> nn.Module:
    if name == "sqnorm":
        return SqNormEnergy(post_norm=False)
    if name == "sqnorm_post":
        return SqNormEnergy(post_norm=True)
    if name == "linear":
        return LinearEnergy(dim)
    raise ValueError(f"unknown energy {name!r}; choose one of {', '.join(ENERGIES)}")
