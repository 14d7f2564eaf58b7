"""Energy heads: a scalar energy per image from the last block's tokens.

``sqnorm`` (default) is ``E = mean_i 1/2 ||h_i||^2`` over all output tokens *before* the final
norm: with LayerNorm's initial affine (gamma 1, beta 0) every normed token has squared norm D, so
the post-norm version is constant at initialisation and gives no restoration signal until the norm's
affine moves (DESIGN.md §2). ``sqnorm_post`` and ``linear`` are the alternatives.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ENERGIES = ("sqnorm", "sqnorm_post", "linear")


class SqNormEnergy(nn.Module):
    def __init__(self, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm

    def forward(self, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        if self.post_norm:
            h = norm(h)
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()  # the energy is a large sum: accumulate half-precision tokens in fp32
        return 0.5 * h.pow(2).sum(-1).mean(-1)


class LinearEnergy(nn.Module):
    """A learned projection of the mean normed token (training-only: ``energy_head.proj``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.normal_(self.proj.weight, std=dim ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return self.proj(norm(h).mean(1)).squeeze(-1)


def build_energy_head(name: str, dim: int) -> nn.Module:
    if name == "sqnorm":
        return SqNormEnergy(post_norm=False)
    if name == "sqnorm_post":
        return SqNormEnergy(post_norm=True)
    if name == "linear":
        return LinearEnergy(dim)
    raise ValueError(f"unknown energy {name!r}; choose one of {', '.join(ENERGIES)}")
