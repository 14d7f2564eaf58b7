"""The training-step benchmark's baseline: what a user writes without fastebm.

A textbook pre-norm ViT energy (no fastebm code), ``F.scaled_dot_product_attention`` forced to the
math backend (the only SDPA path with a double backward), the energy gradient by
``torch.autograd.grad(create_graph=True)`` per restoration step. ``bf16_math=True`` also sets
``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)`` while the graph is built, so that
under bf16 autocast the attention math runs in bf16 instead of PyTorch's default fp32 upcast.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastebm.restore import weighted_mse


class PlainBlock(nn.Module):
    """A textbook pre-norm ViT block with F.scaled_dot_product_attention (no fastebm code)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PlainViTEnergy(nn.Module):
    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6)
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.blocks = nn.ModuleList(PlainBlock(dim, heads) for _ in range(depth))

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return 0.5 * h.float().pow(2).sum(-1).mean(-1)  # the same pre-norm squared-norm energy


class BaselineStep:
    """``x <- x - alpha_t dE/dx`` with autograd.grad(create_graph=True), SDPA math backend."""

    def __init__(self, model: nn.Module, steps: int, bf16_math: bool = False):
        self.model = model
        self.steps = steps
        self.bf16_math = bf16_math
        self.alpha_logits = nn.Parameter(torch.zeros(steps, device=next(model.parameters()).device))

    def parameters(self):
        return list(self.model.parameters()) + [self.alpha_logits]

    def __call__(self, clean, corrupted, weight):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        before = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(self.bf16_math)
        try:
            alphas = F.softplus(self.alpha_logits)
            x = corrupted.detach().requires_grad_(True)
            loss = 0.0
            with sdpa_kernel(SDPBackend.MATH):
                for t in range(self.steps):
                    energy = self.model(x)
                    (g,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
                    x = x - alphas[t] * g
                    loss = loss + weighted_mse(x, clean, weight)
        finally:
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)
        return loss, {}
