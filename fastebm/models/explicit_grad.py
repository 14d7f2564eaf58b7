"""Hand-written input gradient of :class:`~fastebm.models.vit.EnergyViT`: ``(E(x), dE/dx)`` from forward ops.

The explicit engine (DESIGN.md section 4) needs ``dE/dx`` as an ordinary *forward* computation so
that ``torch.compile`` differentiates the restoration step only once (it refuses double backward).
This module runs the ViT forward while keeping what its backward needs, then walks the blocks in
reverse applying the transpose of each layer by hand:

    patch embedding  t = conv(x, W, stride=p)           dx  = conv_transpose(dt, W, stride=p)
    linear           y = x W^T + b                      dx  = dy W
    LayerNorm        y = xhat * gamma + beta            dx  = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat)),
                     xhat = (x - mu) * rstd                   dxh = dy * gamma
    GELU (erf)       y = x Phi(x)                       dx  = dy * (Phi(x) + x phi(x))
    residual         y = x + f(x)                       dx  = dy + f'(x)^T dy
    attention        (o, lse) = fastebm::attn_fwd       (dq, dk, dv) = fastebm::attn_bwd(q, k, v, o, lse, do)
    energy heads     sqnorm:      E = 1/2 mean_i ||h_i||^2          dh = h / N
                     sqnorm_post: E = 1/2 mean_i ||LN(h)_i||^2      dh = LN'(h)^T (LN(h) / N)
                     linear:      E = w . mean_i LN(h)_i + b        dh = LN'(h)^T (w / N)

Every step is a differentiable PyTorch op or a custom op with registered autograd, so the returned
gradient is itself differentiable: one ``.backward()`` of a loss on it gives the exact second-order
parameter gradients (attention through ``attn_bwd`` -> ``attn_dbwd``).

The returned gradient is that of ``E.sum()`` (each sample's energy depends on its own image only, so
this is every sample's ``dE_b/dx_b``). Precision mirrors the model: LayerNorm statistics and the
energy are computed in float32 (float64 for float64 inputs); under autocast the linears run in the
autocast dtype as in the module forward. Gradient checkpointing is not applied here.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.attention_custom_ops import attn_bwd, attn_fwd, resolve_op_backend

Tensor = torch.Tensor

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ LayerNorm
class _LNCache(NamedTuple):
    xhat: Tensor  # normalised input, accumulation dtype
    rstd: Tensor  # 1 / sqrt(var + eps), (..., 1)
    gamma: Optional[Tensor]


def layer_norm_fwd(x: Tensor, norm: torch.nn.LayerNorm) -> Tuple[Tensor, _LNCache]:
    """LayerNorm over the last dim in the accumulation dtype (as autocast runs ``layer_norm``)."""
    xf = x.to(_acc(x))
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
    return y, _LNCache(xhat, rstd, gamma)


def layer_norm_bwd(dy: Tensor, cache: _LNCache) -> Tensor:
    """Input gradient of LayerNorm for upstream ``dy`` (returned in the accumulation dtype)."""
    dxh = dy.to(cache.xhat.dtype)
    if cache.gamma is not None:
        dxh = dxh * cache.gamma.to(dxh.dtype)
    mean_dxh = dxh.mean(-1, keepdim=True)
    mean_dxh_xhat = (dxh * cache.xhat).mean(-1, keepdim=True)
    return cache.rstd * (dxh - mean_dxh - cache.xhat * mean_dxh_xhat)


# ------------------------------------------------------------------------------ GELU
def gelu_grad(u: Tensor) -> Tensor:
    """d/du of the exact (erf) GELU ``u Phi(u)``: ``Phi(u) + u phi(u)``."""
    uf = u.to(_acc(u))
    cdf = 0.5 * (1.0 + torch.erf(uf * _INV_SQRT2))
    pdf = torch.exp(-0.5 * uf * uf) * _INV_SQRT2PI
    return cdf + uf * pdf


def _match(a: Tensor, w: Tensor) -> Tensor:
    # Under autocast the matmul/conv casts both operands itself (as the module forward does);
    # outside it, operands must share a dtype.
    if a.dtype != w.dtype and not torch.is_autocast_enabled(a.device.type):
        return a.to(w.dtype)
    return a


def _linear_input_grad(dy: Tensor, layer: torch.nn.Linear) -> Tensor:
    """``dy @ W`` for ``y = x W^T + b``."""
    return torch.matmul(_match(dy, layer.weight), layer.weight)


class _BlockCache(NamedTuple):
    ln1: _LNCache
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    lse: Tensor
    ln2: _LNCache
    u: Tensor  # fc1 pre-activation


def _block_fwd(blk, h: Tensor, backend: str) -> Tuple[Tensor, _BlockCache]:
    attn = blk.attn
    B, N, C = h.shape
    y1, ln1 = layer_norm_fwd(h, blk.norm1)
    qkv = attn.qkv(y1).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    o, lse = attn_fwd(q, k, v, float(attn.scale), backend)
    h = h + attn.proj(o.transpose(1, 2).reshape(B, N, C))
    y2, ln2 = layer_norm_fwd(h, blk.norm2)
    u = blk.mlp.fc1(y2)
    h = h + blk.mlp.fc2(F.gelu(u))
    return h, _BlockCache(ln1, q, k, v, o, lse, ln2, u)


def _block_bwd(blk, g: Tensor, c: _BlockCache, backend: str) -> Tensor:
    """Given ``g = dE/d(block output)``, returns ``dE/d(block input)``."""
    attn = blk.attn
    B, N, C = g.shape
    # MLP branch: out = h + fc2(gelu(fc1(LN2(h))))
    gm = _linear_input_grad(g, blk.mlp.fc2)
    gu = gm * gelu_grad(c.u).to(gm.dtype)
    gy2 = _linear_input_grad(gu, blk.mlp.fc1)
    g = g + layer_norm_bwd(gy2, c.ln2).to(g.dtype)
    # attention branch: h' = h + proj(attn(qkv(LN1(h))))
    ga = _linear_input_grad(g, attn.proj)
    go = ga.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    # o and lse are caches (attn_dbwd is the total derivative): detached so the outer backward does
    # not also run attn_fwd's backward on a zero cotangent.
    dq, dk, dv = attn_bwd(c.q, c.k, c.v, c.o.detach(), c.lse.detach(), go.to(c.q.dtype), float(attn.scale), backend)
    gqkv = torch.stack((dq, dk, dv), dim=0).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * C)
    gy1 = _linear_input_grad(gqkv, attn.qkv)
    return g + layer_norm_bwd(gy1, c.ln1).to(g.dtype)


def _energy_fwd_bwd(model, h: Tensor) -> Tuple[Tensor, Tensor]:
    """The energy head and its gradient with respect to the last block's tokens ``h``."""
    kind = model.energy_type
    n_tok = h.shape[1]
    if kind == "sqnorm":
        hf = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        energy = 0.5 * hf.pow(2).sum(-1).mean(-1)
        return energy, hf / n_tok
    z, cache = layer_norm_fwd(h, model.norm)
    if kind == "sqnorm_post":
        energy = 0.5 * z.pow(2).sum(-1).mean(-1)
        return energy, layer_norm_bwd(z / n_tok, cache)
    if kind == "linear":
        proj = model.energy_head.proj
        energy = proj(z.mean(1)).squeeze(-1)
        w = proj.weight.reshape(1, 1, -1).to(z.dtype)
        return energy, layer_norm_bwd((w / n_tok).expand_as(z), cache)
    raise ValueError(f"the explicit engine has no hand-written gradient for energy {kind!r}")


def energy_and_input_grad(model, x: Tensor, attn_backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``(E(x), dE/dx)`` of an EnergyViT with a hand-written backward made of forward ops.

    ``E`` is (B,), ``dE/dx`` has ``x``'s shape and dtype and is differentiable (twice through the
    attention custom ops). ``attn_backend`` is the custom ops' kernel family (``"math"`` or
    ``"triton"``); by default it is resolved from the model's ``attn_backend`` and ``x``'s device.
    """
    model.check_input(x)
    blk0 = model.blocks[0].attn
    if attn_backend is None:
        probe = x.new_empty((1, 1, 1, blk0.head_dim))
        attn_backend = resolve_op_backend(probe, model.attn_backend)
    # ---- forward, keeping what the backward needs
    h = model.embed(x)  # patch embedding + class token + position embedding, the module's own code
    caches: List[_BlockCache] = []
    for blk in model.blocks:
        h, cache = _block_fwd(blk, h, attn_backend)
        caches.append(cache)
    energy, g = _energy_fwd_bwd(model, h)
    # ---- backward, blocks in reverse
    g = g.to(h.dtype)
    for blk, cache in zip(reversed(model.blocks), reversed(caches)):
        g = _block_bwd(blk, g, cache, attn_backend)
    # patch embedding: tokens (B, N, D) = conv(x) flattened; its transpose is a strided conv_transpose
    gh, gw = model.patch_embed.grid_size
    g_tok = g[:, 1:].transpose(1, 2).reshape(g.shape[0], -1, gh, gw)
    w_pe = model.patch_embed.proj.weight
    dx = F.conv_transpose2d(_match(g_tok, w_pe), w_pe, stride=model.patch_size)
    return energy, dx.to(x.dtype)


__all__ = ["energy_and_input_grad", "layer_norm_fwd", "layer_norm_bwd", "gelu_grad"]
