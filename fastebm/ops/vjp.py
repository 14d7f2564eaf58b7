"""Hand-written vector-Jacobian products of the ViT's layers, made of differentiable forward ops.

The explicit engine (docs/design.md §4) needs ``dE/dx`` as an ordinary *forward* computation so that
``torch.compile`` differentiates the restoration step only once (it refuses double backward). Each
layer of :mod:`fastebm.models.layers` therefore has a ``forward_with_cache`` that keeps what its
backward needs and an ``input_grad`` that applies the transpose of its Jacobian by hand, built
from these pieces::

    linear           y = x W^T + b                      dx  = dy W
    LayerNorm        y = xhat * gamma + beta            dx  = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat)),
                     xhat = (x - mu) * rstd                   dxh = dy * gamma
    GELU (erf)       y = x Phi(x)                       dx  = dy * (Phi(x) + x phi(x))

Every step is a differentiable PyTorch op, so an input gradient built from them is itself
differentiable (the second-order parameter gradients come from one ``.backward()``). Precision
mirrors autocast: LayerNorm statistics and the GELU derivative are computed in the accumulation
dtype (float32, or float64 for float64 inputs); matmuls run in the autocast dtype under autocast,
as the module forward does.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from ..kernels.attention_common import acc_dtype

Tensor = torch.Tensor

__all__ = ["LNCache", "layer_norm_fwd", "layer_norm_bwd", "gelu_grad", "match_dtype", "linear_input_grad"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


class LNCache(NamedTuple):
    xhat: Tensor  # normalised input, accumulation dtype
    rstd: Tensor  # 1 / sqrt(var + eps), (..., 1)
    gamma: Optional[Tensor]


def layer_norm_fwd(x: Tensor, norm: torch.nn.LayerNorm) -> Tuple[Tensor, LNCache]:
    """LayerNorm of ``x`` over the last dim with ``norm``'s affine and eps, in the accumulation dtype
    (as autocast runs ``layer_norm``); returns ``(y, cache)`` for :func:`layer_norm_bwd`."""
    xf = x.to(acc_dtype(x.dtype))
    mu = xf.mean(-1, keepdim=True)
    xc = xf - mu
    var = xc.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + norm.eps)
    xhat = xc * rstd
    gamma = norm.weight
    y = xhat
    if gamma is not None:
        y = y * gamma.to(y.dtype)
    if norm.bias is not None:
        y = y + norm.bias.to(y.dtype)
    return y, LNCache(xhat, rstd, gamma)


def layer_norm_bwd(dy: Tensor, cache: LNCache) -> Tensor:
    """Input gradient of LayerNorm for upstream ``dy`` (returned in the accumulation dtype)."""
    dxh = dy.to(cache.xhat.dtype)
    if cache.gamma is not None:
        dxh = dxh * cache.gamma.to(dxh.dtype)
    mean_dxh = dxh.mean(-1, keepdim=True)
    mean_dxh_xhat = (dxh * cache.xhat).mean(-1, keepdim=True)
    return cache.rstd * (dxh - mean_dxh - cache.xhat * mean_dxh_xhat)


def gelu_grad(u: Tensor) -> Tensor:
    """d/du of the exact (erf) GELU ``u Phi(u)``: ``Phi(u) + u phi(u)``, in the accumulation dtype."""
    uf = u.to(acc_dtype(u.dtype))
    cdf = 0.5 * (1.0 + torch.erf(uf * _INV_SQRT2))
    pdf = torch.exp(-0.5 * uf * uf) * _INV_SQRT2PI
    return cdf + uf * pdf


def match_dtype(a: Tensor, w: Tensor) -> Tensor:
    """``a`` ready to multiply with weight ``w``: under autocast the matmul/conv casts both operands
    itself (as the module forward does); outside it, operands must share a dtype."""
    if a.dtype != w.dtype and not torch.is_autocast_enabled(a.device.type):
        return a.to(w.dtype)
    return a


def linear_input_grad(dy: Tensor, layer: torch.nn.Linear) -> Tensor:
    """``dy @ W`` for ``y = x W^T + b``."""
    return torch.matmul(match_dtype(dy, layer.weight), layer.weight)
