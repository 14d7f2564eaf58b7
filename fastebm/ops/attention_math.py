"""PyTorch reference for the three attention stages (the specification of the fused kernels).

Shapes: ``q`` is ``(B, H, Nq, d)``, ``k`` and ``v`` are ``(B, H, Nk, d)``; Nq may differ from Nk.
All element-wise work is done in float32 (or float64 when the inputs are float64) and results are
cast back to the input dtype; the row log-sum-exp ``lse`` is kept in the accumulation dtype.

The math is DESIGN.md section 5. Per head, with scale ``s``::

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

``O`` and ``lse`` are caches: the double backward is the total derivative of the first backward
with respect to (Q, K, V, G), so no gradient flows to them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _probs(q: Tensor, k: Tensor, lse: Tensor, scale: float) -> Tensor:
    acc = _acc_dtype(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.exp(s - lse.to(acc).unsqueeze(-1))


def attn_fwd_ref(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Returns ``(O, lse)``: ``O`` in the input dtype, ``lse`` (B, H, Nq) in the accumulation dtype."""
    acc = _acc_dtype(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    o = torch.matmul(p, v.to(acc))
    return o.to(q.dtype), lse


def attn_bwd_ref(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dQ, dK, dV)`` for upstream gradient ``do``."""
    acc = _acc_dtype(q)
    qa, ka, va, ga = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    p = _probs(q, k, lse, scale)
    delta = (o.to(acc) * ga).sum(-1, keepdim=True)
    dp = torch.matmul(ga, va.transpose(-1, -2))
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ka) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qa) * scale
    dv = torch.matmul(p.transpose(-1, -2), ga)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attn_dbwd_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    gq: Optional[Tensor],
    gk: Optional[Tensor],
    gv: Optional[Tensor],
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(Qbar, Kbar, Vbar, Gbar)``: the gradients of ``<gQ,dQ> + <gK,dK> + <gV,dV>``
    with respect to ``(Q, K, V, dO)``. Missing cotangents (``None``) count as zero."""
    acc = _acc_dtype(q)
    qa, ka, va, ga = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    gqa = torch.zeros_like(qa) if gq is None else gq.to(acc)
    gka = torch.zeros_like(ka) if gk is None else gk.to(acc)
    gva = torch.zeros_like(va) if gv is None else gv.to(acc)
    p = _probs(q, k, lse, scale)
    delta = (o.to(acc) * ga).sum(-1, keepdim=True)
    dp = torch.matmul(ga, va.transpose(-1, -2))
    ds = p * (dp - delta)
    u = (torch.matmul(gqa, ka.transpose(-1, -2)) + torch.matmul(qa, gka.transpose(-1, -2))) * scale
    w = torch.matmul(ga, gva.transpose(-1, -2))
    r = (p * u).sum(-1, keepdim=True)
    pbar = w + u * (dp - delta) - r * dp
    c = (p * pbar).sum(-1, keepdim=True)
    dd = p * (u - r)
    sbar = p * (pbar - c)
    qbar = (torch.matmul(ds, gka) + torch.matmul(sbar, ka)) * scale
    kbar = (torch.matmul(ds.transpose(-1, -2), gqa) + torch.matmul(sbar.transpose(-1, -2), qa)) * scale
    vbar = torch.matmul(dd.transpose(-1, -2), ga)
    gbar = torch.matmul(p, gva) + torch.matmul(dd, va)
    return qbar.to(q.dtype), kbar.to(k.dtype), vbar.to(v.dtype), gbar.to(do.dtype)
