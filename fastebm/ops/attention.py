"""``fastebm.ops.attention``: scaled dot-product attention with a double backward.

Backends form a small registry (:mod:`fastebm.ops.attention_registry`). ``math`` (always present,
:mod:`fastebm.ops.attention_math`) is plain PyTorch ops, so autograd differentiates it to any
order; it is the reference and the fallback. The fused Triton backend
(:mod:`fastebm.ops.triton_attention`) is registered here lazily: it is imported the first time a
backend is chosen, and left out when triton cannot be imported.

Backend choice for ``backend="auto"``: the environment variable ``FASTEBM_ATTENTION_BACKEND``
(``triton`` | ``math``) if set, else Triton for CUDA tensors when available, else ``math``.
``resolve_backend`` tells which one a call would use.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.attention_common import check_qkv_shapes
from .attention_math import math_attention
from .attention_registry import (
    ENV_VAR,
    AttentionBackend,
    available_backends,
    get_backend,
    register_backend,
    register_lazy_backend,
    resolve_backend,
)

Tensor = torch.Tensor

__all__ = [
    "attention", "available_backends", "math_attention", "register_backend", "resolve_backend", "ENV_VAR",
    "AttentionBackend",
]


def _load_triton_backend():
    from . import triton_attention  # raises ImportError when triton is not importable

    return triton_attention.triton_attention_fn, triton_attention.supports


register_backend("math", math_attention)
register_lazy_backend("triton", _load_triton_backend)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """``softmax(scale * q k^T) v`` for ``q`` (B, H, Nq, d) and ``k``, ``v`` (B, H, Nk, d).

    Differentiable twice (``create_graph=True`` through the backward is exact) on every backend.
    ``scale`` defaults to ``d ** -0.5``. Raises ValueError for mismatched shapes, an unknown backend,
    or a backend that cannot run on these tensors.
    """
    check_qkv_shapes(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_backend(q, backend)
    return get_backend(name).fn(q, k, v, float(scale))
