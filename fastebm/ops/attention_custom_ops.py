"""Attention stages as ``torch.library`` custom ops, for the compiled explicit engine.

Three ops, each a pure function of tensors (inputs of any strides, outputs always contiguous)::

    fastebm::attn_fwd(q, k, v, scale, backend)                        -> (o, lse)
    fastebm::attn_bwd(q, k, v, o, lse, do, scale, backend)            -> (dq, dk, dv, delta)
    fastebm::attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, scale, backend, delta=None)
                                                                      -> (qbar, kbar, vbar, gbar)

with registered autograd chaining them: the derivative of ``attn_fwd`` is ``attn_bwd``, the
derivative of ``attn_bwd`` is ``attn_dbwd`` (docs/design.md §5), and ``attn_dbwd`` refuses a
further derivative (third order). ``o``, ``lse`` and ``delta = rowsum(O * dO)`` are caches: no
gradient flows to them, their effect on the first backward is already inside ``attn_dbwd``'s total
derivative. ``attn_bwd``'s autograd hands its ``delta`` to ``attn_dbwd`` (not recomputed). Callers
pass ``o`` and ``lse`` to ``attn_bwd`` detached (as this module does), else a double backward walks
back into ``attn_fwd``'s node and spends an extra ``attn_bwd`` on a zero cotangent.

The Python functions :func:`attn_fwd`, :func:`attn_bwd` and :func:`attn_dbwd` are the ops' entry
points; :func:`attn_bwd` returns ``(dq, dk, dv)`` (the op ``attn_bwd_op`` also returns ``delta``).

Why custom ops and not the ``autograd.Function`` of ``fastebm.ops.triton_attention``: under
``torch.compile`` an ``autograd.Function`` differentiated by ``torch.func.grad`` gives silently wrong
second-order gradients, while custom ops are opaque nodes that AOTAutograd differentiates through
their registered formulas (docs/design.md §4). The explicit engine calls ``attn_fwd`` and
``attn_bwd`` itself in the ViT blocks' hand-written input gradient (``fastebm.models.layers``), so
the whole energy gradient is a forward graph; one ``.backward()`` then reaches ``attn_bwd`` and
``attn_dbwd``.

``backend`` is a plain string argument: ``"triton"`` runs ``fastebm.kernels.attention`` (CUDA
tensors, or CPU under ``TRITON_INTERPRET=1``; imported on first use), ``"math"`` runs the PyTorch
references ``fastebm.kernels.attention_ref`` (no triton needed). Callers resolve it with
:func:`resolve_op_backend` outside any compiled region, so the compiled graph holds a constant.

The fake (meta) implementations allocate contiguous outputs, and the real implementations make
their outputs contiguous (the Triton wrappers allocate them so; no copies of strided inputs), so
compiled and eager strides always agree.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..kernels import attention_ref
from ..kernels.attention_common import acc_dtype
from .attention import resolve_backend
from .third_order import refuse_third_order

Tensor = torch.Tensor

__all__ = ["attn_fwd", "attn_bwd", "attn_bwd_op", "attn_dbwd", "resolve_op_backend", "OP_BACKENDS"]

OP_BACKENDS = ("math", "triton")


def resolve_op_backend(q: Tensor, backend: str = "auto") -> str:
    """The kernel family (``"triton"`` or ``"math"``) the custom ops should use for tensors like ``q``
    when a model asks for attention backend ``backend`` (``auto`` | ``math`` | ``triton``)."""
    name = resolve_backend(q, backend)
    if name not in OP_BACKENDS:
        raise ValueError(
            f"attention backend {name!r} has no custom-op implementation; the explicit engine supports "
            f"{', '.join(OP_BACKENDS)} (set the model's attn_backend to one of them)"
        )
    return name


def _stage(backend: str, name: str) -> Callable:
    """The implementation of stage ``name`` (``attn_fwd`` | ``attn_bwd`` | ``attn_dbwd``) for ``backend``,
    looked up at call time."""
    if backend not in OP_BACKENDS:
        raise ValueError(f"unknown custom-op attention backend {backend!r}; choose one of {', '.join(OP_BACKENDS)}")
    if backend == "triton":
        from ..kernels import attention as kernels  # imported lazily: needs triton

        return getattr(kernels, name)
    return getattr(attention_ref, name + "_ref")


def _contig(*ts: Tensor) -> Tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in ts)


# ---------------------------------------------------------------------------------------- fwd
@torch.library.custom_op("fastebm::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    """``(o, lse)``: ``o = softmax(scale q k^T) v`` (q's dtype), ``lse`` its row log-sum-exp (B, H, Nq)."""
    return _contig(*_stage(backend, "attn_fwd")(q, k, v, scale))


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


def _attn_fwd_setup(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _attn_fwd_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    # o and lse enter the backward as caches: detached, so that a second backward does not walk
    # back into attn_fwd's node (an extra attn_bwd on a zero cotangent).
    dq, dk, dv, _delta = attn_bwd_op(q, k, v, o.detach(), lse.detach(), do, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


attn_fwd.register_autograd(_attn_fwd_backward, setup_context=_attn_fwd_setup)


# ---------------------------------------------------------------------------------------- bwd
@torch.library.custom_op("fastebm::attn_bwd", mutates_args=())
def attn_bwd_op(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, delta)``: the attention backward for upstream gradient ``do``, and its row
    statistic ``delta = rowsum(O * dO)`` (B, H, Nq) in the accumulation dtype (non-differentiable)."""
    return _contig(*_stage(backend, "attn_bwd")(q, k, v, o, lse, do, scale, return_delta=True))


@attn_bwd_op.register_fake
def _attn_bwd_fake(q, k, v, o, lse, do, scale, backend):
    delta = q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), delta


def _attn_bwd_setup(ctx, inputs, output):
    q, k, v, o, lse, do, scale, backend = inputs
    delta = output[3]
    ctx.save_for_backward(q, k, v, o, lse, do, delta)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(delta)


def _attn_bwd_backward(ctx, gq, gk, gv, _gdelta):
    q, k, v, o, lse, do, delta = ctx.saved_tensors
    qbar, kbar, vbar, gbar = attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, ctx.scale, ctx.backend, delta)
    # o and lse are caches (no gradient); scale and backend are not tensors.
    return qbar, kbar, vbar, None, None, gbar, None, None


attn_bwd_op.register_autograd(_attn_bwd_backward, setup_context=_attn_bwd_setup)


def attn_bwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, the attention backward for upstream gradient ``do`` through the op
    ``fastebm::attn_bwd`` (whose ``delta`` output its autograd keeps for ``attn_dbwd``); ``o`` and
    ``lse`` should come detached (caches, see the module docstring)."""
    dq, dk, dv, _delta = attn_bwd_op(q, k, v, o, lse, do, scale, backend)
    return dq, dk, dv


# --------------------------------------------------------------------------------------- dbwd
@torch.library.custom_op("fastebm::attn_dbwd", mutates_args=())
def attn_dbwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
    gq: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor], scale: float, backend: str,
    delta: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(qbar, kbar, vbar, gbar)``: gradients of ``<gq,dq> + <gk,dk> + <gv,dv>`` w.r.t. ``(q, k, v, do)``;
    ``None`` cotangents count as zero. ``delta`` is ``attn_bwd_op``'s (recomputed when ``None``)."""
    return _contig(*_stage(backend, "attn_dbwd")(q, k, v, o, lse, do, gq, gk, gv, scale, delta=delta))


@attn_dbwd.register_fake
def _attn_dbwd_fake(q, k, v, o, lse, do, gq, gk, gv, scale, backend, delta=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), do.new_empty(do.shape)


def _attn_dbwd_setup(ctx, inputs, output):
    pass


def _attn_dbwd_backward(ctx, *grads):
    refuse_third_order()


attn_dbwd.register_autograd(_attn_dbwd_backward, setup_context=_attn_dbwd_setup)
