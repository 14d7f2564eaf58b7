"""What the attention kernels, their references and ``fastebm.ops`` agree on (imports no triton).

- :func:`acc_dtype`: the accumulation dtype of every stage (float64 for float64 inputs, else
  float32), used for element-wise work, matmul accumulation and the saved row log-sum-exp.
- :func:`check_qkv_shapes`: the q/k/v shape contract, ``q`` (B, H, Nq, d), ``k``/``v`` (B, H, Nk, d).
- ``SUPPORTED_DTYPES`` and ``MAX_HEAD_DIM``: what the fused kernels accept.

This module imports only torch, so ``fastebm.ops`` (whose math path must work without triton) can
import it.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 128  # larger heads would not fit the kernels' tiles in shared memory


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raises ValueError unless ``q`` is (B, H, Nq, d) and ``k``, ``v`` are (B, H, Nk, d)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D (B, H, N, d) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}; "
            "need q (B,H,Nq,d), k and v (B,H,Nk,d)"
        )
