"""The ``math`` attention backend: plain PyTorch ops, differentiable to any order, no triton needed.

It is the reference of the fused backends and the fallback everywhere else. The stage-by-stage
references (forward, backward, double backward) that the fused kernels implement live beside the
kernels, in ``fastebm.kernels.attention_ref``.
"""
from __future__ import annotations

import torch

from ..kernels.attention_common import acc_dtype

Tensor = torch.Tensor


def math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(scale q k^T) v`` from plain differentiable ops, for q (B, H, Nq, d), k/v (B, H, Nk, d);
    output (B, H, Nq, d) in v's dtype. The softmax runs in the accumulation dtype (float32 for
    float16/bfloat16 inputs)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(s.to(acc_dtype(s.dtype)), dim=-1)
    return torch.matmul(p.to(v.dtype), v)
