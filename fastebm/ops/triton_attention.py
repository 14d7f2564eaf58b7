"""The fused Triton attention backend (eager engine): exact to second order.

Three ``autograd.Function``s chain the kernels of ``fastebm.kernels.attention``:

    _TritonAttention.forward  -> attn_fwd            (saves q, k, v, o, lse: all O(N) memory)
    _TritonAttention.backward -> _TritonAttentionBwd (attn_bwd), itself differentiable; it also
                                 returns delta = rowsum(O * dO) (non-differentiable, O(N))
    _TritonAttentionBwd.backward -> _TritonAttentionDbwd (attn_dbwd, reusing that delta)
    _TritonAttentionDbwd.backward -> RuntimeError (third order is not supported)

so ``torch.autograd.grad(..., create_graph=True)`` through attention followed by a ``backward()``
(the restoration objective's double backward) is exact. ``o`` and ``lse`` are caches: no gradient
flows to them (their effect is inside the row statistics; docs/design.md §5).

This module is for the eager path only. Under ``torch.compile`` with ``torch.func.grad`` an
``autograd.Function`` gives silently wrong second-order gradients (docs/design.md §4); the
compiled engines use math attention or the custom ops instead.

``fastebm.ops.attention`` registers :func:`triton_attention_fn` and :func:`supports` as the backend
``"triton"`` the first time a backend is chosen. Importing this module raises ImportError when
triton is not importable (the registry then keeps the math path only).
"""
from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"triton is not importable ({exc}); the Triton attention backend is unavailable") from exc

from ..kernels.attention import INTERPRETED, attn_bwd, attn_dbwd, attn_fwd
from ..kernels.attention_common import MAX_HEAD_DIM, SUPPORTED_DTYPES
from .third_order import THIRD_ORDER_MESSAGE, refuse_third_order

Tensor = torch.Tensor

__all__ = ["triton_attention_fn", "supports", "THIRD_ORDER_MESSAGE"]


class _TritonAttention(torch.autograd.Function):
    """``o = softmax(scale q k^T) v``; also returns the row log-sum-exp (non-differentiable)."""

    @staticmethod
    def forward(q, k, v, scale):
        return attn_fwd(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        # o and lse enter the backward as constants (caches), hence detach.
        dq, dk, dv, _delta = _TritonAttentionBwd.apply(q, k, v, o.detach(), lse.detach(), do, ctx.scale)
        return dq, dk, dv, None


class _TritonAttentionBwd(torch.autograd.Function):
    """``(dq, dk, dv, delta) = attn_bwd(q, k, v, o, lse, do, return_delta=True)``, differentiable in
    (q, k, v, do); ``delta`` is a cache for the double backward (non-differentiable)."""

    @staticmethod
    def forward(q, k, v, o, lse, do, scale):
        return attn_bwd(q, k, v, o, lse, do, scale, return_delta=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, o, lse, do, scale = inputs
        delta = output[3]
        ctx.save_for_backward(q, k, v, o, lse, do, delta)
        ctx.scale = scale
        ctx.mark_non_differentiable(delta)

    @staticmethod
    def backward(ctx, gq, gk, gv, _gdelta):
        q, k, v, o, lse, do, delta = ctx.saved_tensors
        qbar, kbar, vbar, gbar = _TritonAttentionDbwd.apply(q, k, v, o, lse, do, gq, gk, gv, ctx.scale, delta)
        return qbar, kbar, vbar, None, None, gbar, None


class _TritonAttentionDbwd(torch.autograd.Function):
    """The double-backward kernels as a graph node whose own backward refuses (third order)."""

    @staticmethod
    def forward(q, k, v, o, lse, do, gq, gk, gv, scale, delta):
        return attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, scale, delta=delta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        refuse_third_order()


def triton_attention_fn(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Fused attention ``softmax(scale q k^T) v`` for q (B,H,Nq,d), k/v (B,H,Nk,d), any strides (the
    kernels read views in place); exact first and second derivatives, O(N) memory. The output is
    contiguous."""
    o, _ = _TritonAttention.apply(q, k, v, float(scale))
    return o


def supports(q: Tensor) -> bool:
    """CUDA tensors; CPU tensors too when the kernels run in Triton's interpreter (TRITON_INTERPRET=1
    was set before triton was first imported). Float dtypes, head dims 1..128."""
    on_device = q.is_cuda or (q.device.type == "cpu" and INTERPRETED)
    return on_device and q.dtype in SUPPORTED_DTYPES and 1 <= q.shape[-1] <= MAX_HEAD_DIM
