"""PyTorch references of the three attention stages: the specification of the fused kernels.

``fastebm.kernels.attention`` implements exactly these functions; the kernel tests compare the two
on float64 copies, and ``fastebm.ops`` runs these as its ``math`` custom-op backend. They import
no triton. The math is docs/design.md §5. Per head, with scale ``s``::

    S = s Q K^T,  P = softmax(S) (lse = logsumexp(S)),  O = P V
    first backward (upstream G = dO):
        delta = rowsum(O * G),  dP = G V^T,  dS = P * (dP - delta)
        dQ = s dS K,  dK = s dS^T Q,  dV = P^T G
    double backward (cotangents gQ, gK, gV of dQ, dK, dV):
        U = s (gQ K^T + Q gK^T),  W = G gV^T,  r = rowsum(P * U)
        Pbar = W + U * (dP - delta) - r * dP,  c = rowsum(P * Pbar)
        Dd = P * (U - r),  Sbar = P * (Pbar - c)
        Qbar = s (dS gK + Sbar K),  Kbar = s (dS^T gQ + Sbar^T Q),  Vbar = Dd^T G
        Gbar = P gV + Dd V

Shapes: ``q`` is ``(B, H, Nq, d)``, ``k`` and ``v`` are ``(B, H, Nk, d)``; Nq may differ from Nk.
All element-wise work is done in the accumulation dtype (:func:`acc_dtype`: float32, or float64
for float64 inputs) and results are cast back to the input dtype; ``lse`` stays in the
accumulation dtype. ``O`` and ``lse`` are caches: the double backward is the total derivative of
the first backward with respect to (Q, K, V, G), so no gradient flows to them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .attention_common import acc_dtype

Tensor = torch.Tensor

__all__ = ["attn_fwd_ref", "attn_bwd_ref", "attn_dbwd_ref", "default_scale"]


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    acc = acc_dtype(q.dtype)
    return torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale


def attn_fwd_ref(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Returns ``(O, lse)``: ``O`` in the input dtype, ``lse`` (B, H, Nq) in the accumulation dtype."""
    s = _scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    o = torch.matmul(p, v.to(s.dtype))
    return o.to(q.dtype), lse


class _Backward(NamedTuple):
    """The first backward's intermediates, all in the accumulation dtype."""

    q: Tensor
    k: Tensor
    v: Tensor
    g: Tensor  # the upstream gradient dO
    p: Tensor  # probabilities, recomputed from q, k and lse
    delta: Tensor  # rowsum(O * dO), (B, H, Nq, 1)
    dp: Tensor
    ds: Tensor


def _backward_terms(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float,
                    delta: Optional[Tensor] = None) -> _Backward:
    acc = acc_dtype(q.dtype)
    qa, ka, va, ga = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    p = torch.exp(_scores(q, k, scale) - lse.to(acc).unsqueeze(-1))
    delta = (o.to(acc) * ga).sum(-1, keepdim=True) if delta is None else delta.to(acc).unsqueeze(-1)
    dp = torch.matmul(ga, va.transpose(-1, -2))
    return _Backward(qa, ka, va, ga, p, delta, dp, p * (dp - delta))


def attn_bwd_ref(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float, return_delta: bool = False
):
    """Returns ``(dQ, dK, dV)`` for upstream gradient ``do``; with ``return_delta`` also
    ``delta = rowsum(O * dO)`` ((B, H, Nq), accumulation dtype), which :func:`attn_dbwd_ref` accepts."""
    b = _backward_terms(q, k, v, o, lse, do, scale)
    dq = torch.matmul(b.ds, b.k) * scale
    dk = torch.matmul(b.ds.transpose(-1, -2), b.q) * scale
    dv = torch.matmul(b.p.transpose(-1, -2), b.g)
    grads = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    return (*grads, b.delta.squeeze(-1)) if return_delta else grads


def attn_dbwd_ref(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
    gq: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor], scale: float, delta: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(Qbar, Kbar, Vbar, Gbar)``: the gradients of ``<gQ,dQ> + <gK,dK> + <gV,dV>``
    with respect to ``(Q, K, V, dO)``. Missing cotangents (``None``) count as zero. ``delta``
    (B, H, Nq), the backward's ``rowsum(O * dO)``, is recomputed when not given."""
    b = _backward_terms(q, k, v, o, lse, do, scale, delta)
    gqa = torch.zeros_like(b.q) if gq is None else gq.to(b.q.dtype)
    gka = torch.zeros_like(b.k) if gk is None else gk.to(b.q.dtype)
    gva = torch.zeros_like(b.v) if gv is None else gv.to(b.q.dtype)
    p, dp, ds = b.p, b.dp, b.ds
    u = (torch.matmul(gqa, b.k.transpose(-1, -2)) + torch.matmul(b.q, gka.transpose(-1, -2))) * scale
    w = torch.matmul(b.g, gva.transpose(-1, -2))
    r = (p * u).sum(-1, keepdim=True)
    pbar = w + u * (dp - b.delta) - r * dp
    c = (p * pbar).sum(-1, keepdim=True)
    dd = p * (u - r)
    sbar = p * (pbar - c)
    qbar = (torch.matmul(ds, gka) + torch.matmul(sbar, b.k)) * scale
    kbar = (torch.matmul(ds.transpose(-1, -2), gqa) + torch.matmul(sbar.transpose(-1, -2), b.q)) * scale
    vbar = torch.matmul(dd.transpose(-1, -2), b.g)
    gbar = torch.matmul(p, gva) + torch.matmul(dd, b.v)
    return qbar.to(q.dtype), kbar.to(k.dtype), vbar.to(v.dtype), gbar.to(do.dtype)
