"""``fastebm.ops.attention``: scaled dot-product attention, with a double backward where needed.

Backends form a small registry (:mod:`fastebm.ops.attention_registry`); each declares how many times
its output may be differentiated (``max_order``):

- ``math`` (order 2; always present, :mod:`fastebm.ops.attention_math`): plain PyTorch ops, so
  autograd differentiates it to any order; the reference and the fallback.
- ``triton`` (order 2; :mod:`fastebm.ops.triton_attention`): fused forward, backward and double
  backward kernels; registered lazily (imported the first time a backend is chosen) and left out
  when triton cannot be imported.
- ``sdpa`` (order 1; :mod:`fastebm.ops.attention_first_order`): PyTorch's
  ``scaled_dot_product_attention`` (FlashAttention-2 / memory-efficient / cuDNN on CUDA, its fused
  path on CPU).
- ``xformers`` (order 1): ``xformers.ops.memory_efficient_attention``, registered when xformers is
  installed (``pip install 'fastebm[xformers]'``); CUDA only, imported on first CUDA use.

Where attention is differentiated at most once (restoration by ``RestorationObjective.restore``,
evaluation and feature extraction, the no-graph steps of ``grad_mode="truncated"``, fine-tuning),
wrap the code in :func:`~fastebm.ops.first_order_attention` and ``backend="auto"`` picks the fastest
first-order kernel that supports the tensors: xformers (CUDA, installed), then SDPA, then Triton
(CUDA), then math. Elsewhere (undeclared, or ``attention_order(2)``: the objective's graph-keeping
steps) ``auto`` picks a second-order backend: Triton for CUDA tensors when available, else math.
The environment variable ``FASTEBM_ATTENTION_BACKEND`` (a backend name) overrides ``auto`` in both.

Safety: a first-order-only backend's output raises RuntimeError, naming the backend and the fix,
when a backward through it runs with ``create_graph=True`` (its gradient would be a constant, so the
second derivative would be silently wrong); under a declared ``attention_order(2)`` naming one is a
ValueError before anything runs (docs/design.md §4). ``resolve_backend`` tells which backend a call
would use.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.attention_common import check_qkv_shapes
from .attention_first_order import sdpa_attention, sdpa_supports, xformers_attention, xformers_installed, xformers_supports
from .attention_math import math_attention
from .attention_order import attention_order, current_attention_order, first_order_attention
from .attention_registry import (
    ENV_VAR,
    FIRST_ORDER_PREFERENCE,
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
    "AttentionBackend", "FIRST_ORDER_PREFERENCE", "attention_order", "first_order_attention",
    "current_attention_order",
]


def _load_triton_backend():
    from . import triton_attention  # raises ImportError when triton is not importable

    return triton_attention.triton_attention_fn, triton_attention.supports


def _load_xformers_backend():
    if not xformers_installed():
        raise ImportError("xformers is not installed (pip install 'fastebm[xformers]')")
    return xformers_attention, xformers_supports


register_backend("math", math_attention)
register_backend("sdpa", sdpa_attention, sdpa_supports, max_order=1)
register_lazy_backend("triton", _load_triton_backend)
register_lazy_backend("xformers", _load_xformers_backend, max_order=1)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, backend: str = "auto",
              order: Optional[int] = None) -> Tensor:
    """``softmax(scale * q k^T) v`` for ``q`` (B, H, Nq, d) and ``k``, ``v`` (B, H, Nk, d); output
    (B, H, Nq, d) in the inputs' dtype.

    ``scale`` defaults to ``d ** -0.5``. ``backend``: ``"auto"`` or a registered name (``math``,
    ``triton``, ``sdpa``, ``xformers``). ``order`` (1 or 2) is how many times the output will be
    differentiated; None (default) takes the enclosing ``first_order_attention()`` /
    ``attention_order()`` declaration. Second-order backends are exact under
    ``create_graph=True``; a first-order-only backend raises RuntimeError there. Raises ValueError
    for mismatched shapes, an unknown backend, a backend that cannot run on these tensors, or a
    first-order-only backend under order 2.
    """
    check_qkv_shapes(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_backend(q, backend, order)
    return get_backend(name).fn(q, k, v, float(scale))
