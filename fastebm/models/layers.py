"""The ViT's layers, each with its forward and its hand-written input gradient side by side.

Parameter names are timm's ``VisionTransformer`` names. Every layer has the usual ``forward``
(what the eager and ``func`` engines differentiate with autograd) and, for the explicit engine
(docs/design.md §4), a ``forward_with_cache`` that computes the same output while keeping what the
backward needs, and an ``input_grad`` that maps ``dE/d(output)`` to ``dE/d(input)`` with forward ops
only (:mod:`fastebm.ops.vjp`; attention through the ``fastebm::attn_*`` custom ops), so the input
gradient is itself differentiable (second order through ``attn_bwd`` -> ``attn_dbwd``).

``tests/test_model.py`` checks each ``input_grad`` against ``torch.autograd`` in float64.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import attention
from ..ops.attention_custom_ops import attn_bwd, attn_fwd
from ..ops.vjp import LNCache, gelu_grad, layer_norm_bwd, layer_norm_fwd, linear_input_grad, match_dtype

Tensor = torch.Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (timm name: ``patch_embed.proj``)."""

    def __init__(self, img_size: Tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)

    def input_grad(self, g: Tensor) -> Tensor:
        """``dE/dx`` (B, C, H, W) from ``g = dE/d(tokens)`` (B, N, D): the transpose of the strided conv
        is a strided ``conv_transpose2d`` with the same weight (the bias drops out)."""
        gh, gw = self.grid_size
        g = g.transpose(1, 2).reshape(g.shape[0], -1, gh, gw)
        w = self.proj.weight
        return F.conv_transpose2d(match_dtype(g, w), w, stride=self.patch_size)


class AttentionCache(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor  # attention output before the projection, (B, H, N, d)
    lse: Tensor  # its row log-sum-exp


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # q, k, v: (B, H, N, d)

    def _project(self, o: Tensor) -> Tensor:
        B, H, N, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, H * d))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(x)
        return self._project(attention(q, k, v, scale=self.scale, backend=self.backend))

    def forward_with_cache(self, x: Tensor, op_backend: str) -> Tuple[Tensor, AttentionCache]:
        """``forward(x)`` with attention through the ``fastebm::attn_fwd`` custom op (kernel family
        ``op_backend``: ``"math"`` or ``"triton"``), and what :meth:`input_grad` needs."""
        q, k, v = self._heads(x)
        o, lse = attn_fwd(q, k, v, float(self.scale), op_backend)
        return self._project(o), AttentionCache(q, k, v, o, lse)

    def input_grad(self, g: Tensor, cache: AttentionCache, op_backend: str) -> Tensor:
        """``dE/dx`` from ``g = dE/d(output)`` (B, N, C), through ``fastebm::attn_bwd``."""
        B, N, C = g.shape
        go = linear_input_grad(g, self.proj).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        c = cache
        # o and lse are caches (attn_dbwd is the total derivative): detached so the outer backward does
        # not also run attn_fwd's backward on a zero cotangent.
        dq, dk, dv = attn_bwd(c.q, c.k, c.v, c.o.detach(), c.lse.detach(), go.to(c.q.dtype), float(self.scale),
                              op_backend)
        gqkv = torch.stack((dq, dk, dv), dim=0).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * C)
        return linear_input_grad(gqkv, self.qkv)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward_with_cache(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(forward(x), u)`` with ``u = fc1(x)``, the GELU input :meth:`input_grad` needs."""
        u = self.fc1(x)
        return self.fc2(self.act(u)), u

    def input_grad(self, g: Tensor, u: Tensor) -> Tensor:
        gm = linear_input_grad(g, self.fc2)
        return linear_input_grad(gm * gelu_grad(u).to(gm.dtype), self.fc1)


class BlockCache(NamedTuple):
    ln1: LNCache
    attn: AttentionCache
    ln2: LNCache
    u: Tensor  # fc1 pre-activation


class Block(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_with_cache(self, x: Tensor, op_backend: str) -> Tuple[Tensor, BlockCache]:
        """``forward(x)`` (LayerNorms in the accumulation dtype, attention through the custom ops)
        and the cache :meth:`input_grad` needs."""
        y1, ln1 = layer_norm_fwd(x, self.norm1)
        a, attn = self.attn.forward_with_cache(y1, op_backend)
        x = x + a
        y2, ln2 = layer_norm_fwd(x, self.norm2)
        m, u = self.mlp.forward_with_cache(y2)
        return x + m, BlockCache(ln1, attn, ln2, u)

    def input_grad(self, g: Tensor, cache: BlockCache, op_backend: str) -> Tensor:
        """``dE/d(block input)`` from ``g = dE/d(block output)``; residuals pass ``g`` through."""
        g = g + layer_norm_bwd(self.mlp.input_grad(g, cache.u), cache.ln2).to(g.dtype)
        return g + layer_norm_bwd(self.attn.input_grad(g, cache.attn, op_backend), cache.ln1).to(g.dtype)
