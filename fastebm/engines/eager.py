"""The ``eager`` engine's attention check: its graph-keeping steps need a second-order backend.

The eager engine differentiates ``dE/dx`` with ``torch.autograd.grad``; the objective declares the
attention order of each step (``fastebm.ops.attention_order``): 2 for the steps that keep their
graph (every ``exact`` step, the last ``truncated`` one), 1 for the rest, where ``auto`` picks the
fastest first-order kernel. A model whose attention is *named* first-order only (``sdpa``,
``xformers``, or ``FASTEBM_ATTENTION_BACKEND`` forcing one) cannot take a graph-keeping step;
:func:`check_second_order_attention` says so before any step runs.
"""
from __future__ import annotations

import torch

from ..ops.attention import resolve_backend

Tensor = torch.Tensor


def check_second_order_attention(model, x: Tensor) -> None:
    """Raises ValueError (naming the backend and the fix) unless every attention module of ``model``
    (a module with ``backend`` and ``head_dim`` attributes) resolves, for tensors like ``x``, to a
    backend that is exact under a double backward."""
    seen = set()
    for mod in model.modules():
        backend, head_dim = getattr(mod, "backend", None), getattr(mod, "head_dim", None)
        if backend is None or head_dim is None or (backend, head_dim) in seen:
            continue
        seen.add((backend, head_dim))
        resolve_backend(x.new_empty((1, 1, 1, head_dim)), backend, order=2)
