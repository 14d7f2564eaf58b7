"""Triton kernels for attention with an exact double backward (``fastebm.kernels.attention``).

Three stages, each a plain function on tensors (no autograd inside, outputs allocated with
``torch.empty`` and always contiguous), so that both an ``autograd.Function`` (eager engine) and
``torch.library.custom_op``s (explicit engine) can call them:

- ``attn_fwd(q, k, v, scale) -> (o, lse)``
- ``attn_bwd(q, k, v, o, lse, do, scale) -> (dq, dk, dv)``
- ``attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, scale) -> (qbar, kbar, vbar, gbar)``

Shapes: ``q`` (B, H, Nq, d), ``k``/``v`` (B, H, Nk, d); Nq may differ from Nk. ``lse`` is (B, H, Nq)
in float32 (float64 for float64 inputs). Inputs may be float16, bfloat16, float32 or float64 (the
last mostly for gradcheck); all element-wise work and every matmul accumulate in float32 (float64
for float64 inputs). float32 matmuls use 3xTF32 on tensor cores (about fp32 accuracy; see
``_dot_precision``), so fp32 results match a float64 reference to ~1e-6 relative. The
head dimension (1..128) is padded to a power of two >= 16 with masking; ragged last tiles along Nq
and Nk are masked.

The specification of each stage is the PyTorch reference beside these kernels,
``fastebm.kernels.attention_ref`` (re-exported here as ``attn_fwd_ref``, ``attn_bwd_ref``,
``attn_dbwd_ref``); the math is docs/design.md §5. No kernel or wrapper allocates anything of size
B*H*Nq*Nk: probabilities are recomputed per tile from q, k and the saved row log-sum-exp.

On a machine without a GPU the kernels run in Triton's interpreter; ``TRITON_INTERPRET=1`` must be
in the environment before triton is first imported. This package imports nothing from the rest of
fastebm.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .attention_common import MAX_HEAD_DIM, SUPPORTED_DTYPES, acc_dtype, check_qkv_shapes
from .attention_ref import attn_bwd_ref, attn_dbwd_ref, attn_fwd_ref

Tensor = torch.Tensor

__all__ = ["attn_fwd", "attn_bwd", "attn_dbwd", "attn_fwd_ref", "attn_bwd_ref", "attn_dbwd_ref", "MAX_HEAD_DIM"]

# Triton picks the interpreter when a kernel is decorated, from the environment at import time:
# True when these kernels run in the interpreter (CPU tensors allowed, nothing compiled).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tile size used in the interpreter. Its cost is Python overhead per tile operation, so large tiles
# are fastest; tests lower it (monkeypatch) to exercise multi-tile loops with ragged last tiles.
INTERPRETER_BLOCK = 64


# Sequence lengths are not specialised (do_not_specialize): Triton would otherwise compile a
# kernel per "N divisible by 16 / N == 1 / other", and they only enter masks and loop bounds.

# --------------------------------------------------------------------------------------------
# Shared device helpers (inlined by Triton)
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, offs_row, offs_d, N, D):
    # Rows of a contiguous (N, D) matrix; out-of-range rows and padded head-dim columns read 0.
    ptrs = base + offs_row[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=(offs_row[:, None] < N) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_tile(base, x, offs_row, offs_d, N, D):
    ptrs = base + offs_row[:, None] * D + offs_d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(offs_row[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _load_row(base, offs_row, N):
    return tl.load(base + offs_row, mask=offs_row < N, other=0.0)


@triton.jit
def _program_tile(BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # This program's batch*head index, its BLOCK rows (tile program_id(1)) and the head-dim columns.
    return tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK), tl.arange(0, BLOCK_D)


@triton.jit
def _scale(scale_hi, scale_lo, ACC: tl.constexpr):
    # The scale arrives as two float32 halves (see _scale_parts), summed in the accumulation dtype.
    return tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)


@triton.jit
def _dot_t(a, b, DOT_PREC: tl.constexpr):
    # a b^T
    return tl.dot(a, tl.trans(b), input_precision=DOT_PREC)


@triton.jit
def _probs(q, k, lse, valid, scale, DOT_PREC: tl.constexpr):
    # P = exp(s q k^T - lse), 0 outside the valid (row, key) pairs.
    return tl.where(valid, tl.exp(scale * _dot_t(q, k, DOT_PREC) - lse[:, None]), 0.0)


@triton.jit
def _load_q_tiles(Q, DO, GQ, bh, offs_m, offs_d, NQ, D):
    # The double backward's query-side tiles of rows offs_m: q, the upstream gradient G, gQ.
    off = bh * NQ * D
    return (_load_tile(Q + off, offs_m, offs_d, NQ, D), _load_tile(DO + off, offs_m, offs_d, NQ, D),
            _load_tile(GQ + off, offs_m, offs_d, NQ, D))


@triton.jit
def _load_kv_tiles(K, V, GK, GV, bh, offs_n, offs_d, NK, D):
    # The double backward's key-side tiles of keys offs_n: k, v, gK, gV.
    off = bh * NK * D
    return (_load_tile(K + off, offs_n, offs_d, NK, D), _load_tile(V + off, offs_n, offs_d, NK, D),
            _load_tile(GK + off, offs_n, offs_d, NK, D), _load_tile(GV + off, offs_n, offs_d, NK, D))


@triton.jit
def _dbwd_tile(q, g, gq, k, v, gk, gv, lse, valid, scale, DOT_PREC: tl.constexpr):
    # Double backward of one tile pair: P, U = s (gQ K^T + Q gK^T), dP = G V^T, W = G gV^T.
    p = _probs(q, k, lse, valid, scale, DOT_PREC)
    u = scale * (_dot_t(gq, k, DOT_PREC) + _dot_t(q, gk, DOT_PREC))
    return p, u, _dot_t(g, v, DOT_PREC), _dot_t(g, gv, DOT_PREC)


@triton.jit
def _dbwd_terms(p, u, dp, w, delta, r, c):
    # dS, Sbar and Dd of one tile pair once the row statistics r and c are known.
    dp_c = dp - delta[:, None]
    ds = p * dp_c
    sbar = p * (w + u * dp_c - r[:, None] * dp - c[:, None])
    dd = p * (u - r[:, None])
    return ds, sbar, dd


# --------------------------------------------------------------------------------------------
# Forward.  Reference: attn_fwd_ref.
# One program per (batch*head, BLOCK_M rows of Q). The Q tile stays resident; loop over K/V tiles
# of BLOCK_N keys with the online softmax (running max m, running sum l, rescaled accumulator),
# then O = acc / l and lse = m + log(l). Padded key columns get score -inf.
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, scale_hi, scale_lo, NQ, NK, D,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, offs_m, offs_d = _program_tile(BLOCK_M, BLOCK_D)
    q = _load_tile(Q + bh * NQ * D, offs_m, offs_d, NQ, D)
    k_base = K + bh * NK * D
    v_base = V + bh * NK * D

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, NK, D)
        v = _load_tile(v_base, offs_n, offs_d, NK, D)
        s = scale * _dot_t(q, k, DOT_PREC)
        s = tl.where((offs_n < NK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    _store_tile(O + bh * NQ * D, acc / l_i[:, None], offs_m, offs_d, NQ, D)
    tl.store(LSE + bh * NQ + offs_m, m_i + tl.log(l_i), mask=offs_m < NQ)


# --------------------------------------------------------------------------------------------
# Backward.  Reference: attn_bwd_ref.
# (1) delta pre-pass: one program per (batch*head, BLOCK_M rows): delta = rowsum(O * dO).
# (2) dK/dV kernel: one program per (batch*head, BLOCK_N keys); the K/V tile stays resident; loop
#     over Q tiles recomputing P = exp(s q k^T - lse): dV += P^T dO, dS = P (dO V^T - delta),
#     dK += dS^T Q. Each program owns its dK/dV rows, so no atomics.
# (3) dQ kernel: one program per (batch*head, BLOCK_M rows); the Q tile stays resident; loop over
#     K/V tiles: dQ += dS K.
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["NQ"])
def _attn_bwd_delta_kernel(
    O, DO, DELTA, NQ, D,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, offs_m, offs_d = _program_tile(BLOCK_M, BLOCK_D)
    o = _load_tile(O + bh * NQ * D, offs_m, offs_d, NQ, D).to(ACC)
    do = _load_tile(DO + bh * NQ * D, offs_m, offs_d, NQ, D).to(ACC)
    tl.store(DELTA + bh * NQ + offs_m, tl.sum(o * do, 1), mask=offs_m < NQ)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, scale_hi, scale_lo, NQ, NK, D,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, offs_n, offs_d = _program_tile(BLOCK_N, BLOCK_D)
    k = _load_tile(K + bh * NK * D, offs_n, offs_d, NK, D)
    v = _load_tile(V + bh * NK * D, offs_n, offs_d, NK, D)
    q_base = Q + bh * NQ * D
    do_base = DO + bh * NQ * D

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid = (offs_m < NQ)[:, None] & (offs_n < NK)[None, :]
        q = _load_tile(q_base, offs_m, offs_d, NQ, D)
        do = _load_tile(do_base, offs_m, offs_d, NQ, D)
        lse = _load_row(LSE + bh * NQ, offs_m, NQ)
        delta = _load_row(DELTA + bh * NQ, offs_m, NQ)
        p = _probs(q, k, lse, valid, scale, DOT_PREC)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC)
        ds = p * (_dot_t(do, v, DOT_PREC) - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)

    _store_tile(DK + bh * NK * D, scale * dk, offs_n, offs_d, NK, D)
    _store_tile(DV + bh * NK * D, dv, offs_n, offs_d, NK, D)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, scale_hi, scale_lo, NQ, NK, D,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, offs_m, offs_d = _program_tile(BLOCK_M, BLOCK_D)
    q = _load_tile(Q + bh * NQ * D, offs_m, offs_d, NQ, D)
    do = _load_tile(DO + bh * NQ * D, offs_m, offs_d, NQ, D)
    lse = _load_row(LSE + bh * NQ, offs_m, NQ)
    delta = _load_row(DELTA + bh * NQ, offs_m, NQ)
    k_base = K + bh * NK * D
    v_base = V + bh * NK * D

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, NK, D)
        v = _load_tile(v_base, offs_n, offs_d, NK, D)
        p = _probs(q, k, lse, (offs_n < NK)[None, :], scale, DOT_PREC)
        ds = p * (_dot_t(do, v, DOT_PREC) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    _store_tile(DQ + bh * NQ * D, scale * dq, offs_m, offs_d, NQ, D)


# --------------------------------------------------------------------------------------------
# Double backward.  Reference: attn_dbwd_ref (docs/design.md §5).
# Per tile everything is recomputed from resident tiles (_dbwd_tile):
#   P = exp(s Q K^T - lse), dP = G V^T, U = s (gQ K^T + Q gK^T), W = G gV^T.
# (1) row kernel: one program per (batch*head, BLOCK_M rows); Q, G, gQ tiles resident.
#     Pass 1 over K/V tiles: the row statistics
#         r  = rowsum(P U),  c1 = rowsum(P (W + U (dP - delta))),  c2 = rowsum(P dP),
#     then c = c1 - r c2 (= rowsum(P Pbar) since Pbar = W + U (dP - delta) - r dP).
#     Pass 2 over K/V tiles, now that r and c are known (_dbwd_terms):
#         dS = P (dP - delta), Sbar = P (Pbar - c), Dd = P (U - r),
#         Qbar += dS gK + Sbar K (times s),  Gbar += P gV + Dd V.
#     r and c are written out (B*H*Nq floats each) for the column kernel.
# (2) column kernel: one program per (batch*head, BLOCK_N keys); K, V, gK, gV tiles resident;
#     loop over Q tiles with the row statistics from (1):
#         Kbar += dS^T gQ + Sbar^T Q (times s),  Vbar += Dd^T G.
# Both kernels own their output rows, so no atomics.
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_dbwd_row_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA,
    QBAR, GBAR, R, C, scale_hi, scale_lo, NQ, NK, D,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, offs_m, offs_d = _program_tile(BLOCK_M, BLOCK_D)
    q, g, gq = _load_q_tiles(Q, DO, GQ, bh, offs_m, offs_d, NQ, D)
    lse = _load_row(LSE + bh * NQ, offs_m, NQ)
    delta = _load_row(DELTA + bh * NQ, offs_m, NQ)

    # Pass 1: row statistics r and c.
    r = tl.zeros([BLOCK_M], ACC)
    c1 = tl.zeros([BLOCK_M], ACC)
    c2 = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, gk, gv = _load_kv_tiles(K, V, GK, GV, bh, offs_n, offs_d, NK, D)
        p, u, dp, w = _dbwd_tile(q, g, gq, k, v, gk, gv, lse, (offs_n < NK)[None, :], scale, DOT_PREC)
        r += tl.sum(p * u, 1)
        c1 += tl.sum(p * (w + u * (dp - delta[:, None])), 1)
        c2 += tl.sum(p * dp, 1)
    c = c1 - r * c2

    # Pass 2: Qbar and Gbar.
    qbar = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gbar = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, gk, gv = _load_kv_tiles(K, V, GK, GV, bh, offs_n, offs_d, NK, D)
        p, u, dp, w = _dbwd_tile(q, g, gq, k, v, gk, gv, lse, (offs_n < NK)[None, :], scale, DOT_PREC)
        ds, sbar, dd = _dbwd_terms(p, u, dp, w, delta, r, c)
        qbar += tl.dot(ds.to(gk.dtype), gk, input_precision=DOT_PREC)
        qbar += tl.dot(sbar.to(k.dtype), k, input_precision=DOT_PREC)
        gbar += tl.dot(p.to(gv.dtype), gv, input_precision=DOT_PREC)
        gbar += tl.dot(dd.to(v.dtype), v, input_precision=DOT_PREC)

    _store_tile(QBAR + bh * NQ * D, scale * qbar, offs_m, offs_d, NQ, D)
    _store_tile(GBAR + bh * NQ * D, gbar, offs_m, offs_d, NQ, D)
    tl.store(R + bh * NQ + offs_m, r, mask=offs_m < NQ)
    tl.store(C + bh * NQ + offs_m, c, mask=offs_m < NQ)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_dbwd_col_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, R, C,
    KBAR, VBAR, scale_hi, scale_lo, NQ, NK, D,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, offs_n, offs_d = _program_tile(BLOCK_N, BLOCK_D)
    k, v, gk, gv = _load_kv_tiles(K, V, GK, GV, bh, offs_n, offs_d, NK, D)

    kbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    vbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid = (offs_m < NQ)[:, None] & (offs_n < NK)[None, :]
        q, g, gq = _load_q_tiles(Q, DO, GQ, bh, offs_m, offs_d, NQ, D)
        lse = _load_row(LSE + bh * NQ, offs_m, NQ)
        delta = _load_row(DELTA + bh * NQ, offs_m, NQ)
        r = _load_row(R + bh * NQ, offs_m, NQ)
        c = _load_row(C + bh * NQ, offs_m, NQ)
        p, u, dp, w = _dbwd_tile(q, g, gq, k, v, gk, gv, lse, valid, scale, DOT_PREC)
        ds, sbar, dd = _dbwd_terms(p, u, dp, w, delta, r, c)
        kbar += tl.dot(tl.trans(ds).to(gq.dtype), gq, input_precision=DOT_PREC)
        kbar += tl.dot(tl.trans(sbar).to(q.dtype), q, input_precision=DOT_PREC)
        vbar += tl.dot(tl.trans(dd).to(g.dtype), g, input_precision=DOT_PREC)

    _store_tile(KBAR + bh * NK * D, scale * kbar, offs_n, offs_d, NK, D)
    _store_tile(VBAR + bh * NK * D, vbar, offs_n, offs_d, NK, D)


# --------------------------------------------------------------------------------------------
# Host-side wrappers
# --------------------------------------------------------------------------------------------


def _tl_acc(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton type (the kernels' ACC)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


# float32 matmul precision: None follows torch.get_float32_matmul_precision() ("highest" and
# "high" -> "tf32x3", "medium" -> "tf32"); or one of Triton's "ieee" | "tf32x3" | "tf32".
FP32_DOT_PRECISION: Optional[str] = None


def _dot_precision(dtype: torch.dtype) -> str:
    """Matmul precision of the kernels' tl.dot for this input dtype.

    float32 uses 3xTF32 by default: three tensor-core TF32 products (hi*hi + hi*lo + lo*hi) that
    carry ~22 mantissa bits, about fp32 accuracy (~1e-6 relative); Triton's IEEE fp32 dot runs on
    CUDA cores and, at these tile sizes, spills tens of KB of registers on sm_90. Plain TF32
    (~1e-3) only when torch's float32 matmul precision is "medium". float64 is always IEEE; half
    inputs use tensor cores as they are ("tf32" is Triton's default flag; it does not affect them).
    The interpreter ignores the flag (numpy matmul in the input dtype)."""
    if dtype == torch.float32:
        if FP32_DOT_PRECISION is not None:
            return FP32_DOT_PRECISION
        return "tf32" if torch.get_float32_matmul_precision() == "medium" else "tf32x3"
    return "ieee" if dtype == torch.float64 else "tf32"


def _scale_parts(scale: float) -> Tuple[float, float]:
    # Float kernel arguments are float32. The scale travels as hi + lo (both float32) and each
    # kernel sums them in its accumulation dtype, so float64 runs keep a ~1e-14 accurate scale
    # (gradcheck and float64 references need it); in float32 the sum is just hi.
    hi = float(np.float32(scale))
    return hi, float(scale) - hi


def _check_device(t: Tensor) -> None:
    if not t.is_cuda and not INTERPRETED:
        raise ValueError(
            f"the Triton attention kernels got a {t.device.type} tensor; they need CUDA tensors, or "
            "TRITON_INTERPRET=1 in the environment before triton is first imported to run on CPU "
            "(slow; for tests). Otherwise use backend='math'."
        )


def _validate(q: Tensor, k: Tensor, v: Tensor, o: Optional[Tensor] = None, lse: Optional[Tensor] = None,
              do: Optional[Tensor] = None) -> None:
    """Checks q, k, v and, for the backward stages, the saved ``o``, ``lse`` and upstream ``do``."""
    check_qkv_shapes(q, k, v)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"attention kernels need q, k, v of one dtype among float16/bfloat16/float32/float64; "
            f"got {q.dtype}, {k.dtype}, {v.dtype} (cast them first)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    d = q.shape[-1]
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is outside 1..{MAX_HEAD_DIM}; use backend='math' for it")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"attention needs at least one query and one key; got Nq={q.shape[2]}, Nk={k.shape[2]}")
    _check_device(q)
    if o is None:
        return
    if o.shape != q.shape or do.shape != q.shape:
        raise ValueError(f"o{tuple(o.shape)} and do{tuple(do.shape)} must have q's shape {tuple(q.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {tuple(q.shape[:3])}")


def _like(t: Optional[Tensor], ref: Tensor, name: str) -> Tensor:
    """A contiguous tensor shaped and typed like ``ref``; ``None`` (a zero cotangent) becomes zeros."""
    if t is None:
        return torch.zeros_like(ref, memory_format=torch.contiguous_format)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    return t.to(dtype=ref.dtype).contiguous()


# GPU launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, by input class
# and head-dim bucket. Chosen from sm_90 compiles (Triton 3.8 + ptxas): no or small register spills
# and shared memory under H100's 227 KB. BLOCK_M tiles Q rows, BLOCK_N tiles K/V rows; the column
# kernels (dkdv, dbwd_col) keep BLOCK_N rows resident and loop over BLOCK_M-row Q tiles.
KERNELS = ("fwd", "dkdv", "dq", "dbwd_row", "dbwd_col")
_COLUMN_KERNELS = ("dkdv", "dbwd_col")


def _cfg(*per_kernel):
    return dict(zip(KERNELS, per_kernel))


_GPU_CONFIGS = {
    #                 fwd              dkdv            dq              dbwd_row        dbwd_col
    ("half", 64): _cfg((128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 1), (32, 64, 8, 1)),
    ("half", 128): _cfg((128, 64, 8, 2), (64, 64, 8, 1), (64, 64, 8, 1), (64, 32, 8, 1), (16, 64, 8, 1)),
    ("fp32", 64): _cfg((64, 64, 4, 2), (32, 64, 4, 1), (64, 64, 8, 1), (64, 32, 8, 1), (16, 64, 8, 1)),
    ("fp32", 128): _cfg((64, 64, 8, 1), (16, 64, 8, 1), (64, 32, 8, 1), (64, 16, 8, 1), (16, 32, 8, 1)),
    ("fp64", 64): _cfg((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
    ("fp64", 128): _cfg((32, 32, 4, 1), (32, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1), (16, 16, 4, 1)),
}


def _config(q: Tensor, kernel: str) -> dict:
    """Tile sizes and launch options for ``q`` (see :func:`launch_config`)."""
    return launch_config(q.dtype, q.shape[-1], kernel, on_gpu=q.is_cuda and not INTERPRETED)


def launch_config(dtype: torch.dtype, head_dim: int, kernel: str, on_gpu: bool) -> dict:
    """Tile sizes and launch options of ``kernel`` (one of ``KERNELS``) for inputs of ``dtype``.

    In the interpreter every tile is INTERPRETER_BLOCK wide; on a GPU see ``_GPU_CONFIGS``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if not on_gpu:
        return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, BLOCK_D=block_d)
    kind = {torch.float32: "fp32", torch.float64: "fp64"}.get(dtype, "half")
    bm, bn, warps, stages = _GPU_CONFIGS[(kind, 64 if block_d <= 64 else 128)][kernel]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def _launch(kernel, name: str, tensors: tuple, q: Tensor, nk: int, scale: float) -> None:
    """Runs one of the five main kernels (configuration ``name``) on a (B*H, tiles) grid: tiles of
    BLOCK_N keys for the column kernels, of BLOCK_M query rows for the others."""
    B, H, NQ, D = q.shape
    cfg = _config(q, name)
    tiles = triton.cdiv(nk, cfg["BLOCK_N"]) if name in _COLUMN_KERNELS else triton.cdiv(NQ, cfg["BLOCK_M"])
    s_hi, s_lo = _scale_parts(scale)
    kernel[(B * H, tiles)](
        *tensors, s_hi, s_lo, NQ, nk, D, ACC=_tl_acc(q.dtype), DOT_PREC=_dot_precision(q.dtype), **cfg
    )


def _interpreter_bf16(q: Tensor) -> bool:
    # Triton's interpreter multiplies bfloat16 tiles as raw 16-bit integers (numpy has no
    # bfloat16), so there the wrappers compute bfloat16 inputs in float32 and cast back.
    return INTERPRETED and q.dtype == torch.bfloat16


def _f32(*ts: Optional[Tensor]):
    return [None if t is None else t.float() for t in ts]


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Fused attention forward: ``(O, lse)`` with ``O = softmax(scale q k^T) v`` (input dtype,
    contiguous) and ``lse`` the row log-sum-exp of ``scale q k^T`` (B, H, Nq), float32/64."""
    _validate(q, k, v)
    if _interpreter_bf16(q):
        o, lse = attn_fwd(*_f32(q, k, v), scale)
        return o.to(q.dtype), lse
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=acc_dtype(q.dtype))
    _launch(_attn_fwd_kernel, "fwd", (q, k, v, o, lse), q, k.shape[2], scale)
    return o, lse


def _saved(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor):
    """The backward stages' inputs made contiguous in the kernels' dtypes, and delta = rowsum(O * dO)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = o.to(q.dtype).contiguous()
    do = do.to(q.dtype).contiguous()
    lse = lse.to(acc_dtype(q.dtype)).contiguous()
    B, H, NQ, D = q.shape
    delta = torch.empty((B, H, NQ), device=q.device, dtype=acc_dtype(q.dtype))
    cfg = _config(q, "dq")
    _attn_bwd_delta_kernel[(B * H, triton.cdiv(NQ, cfg["BLOCK_M"]))](
        o, do, delta, NQ, D, ACC=_tl_acc(q.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"]
    )
    return q, k, v, lse, do, delta


def attn_bwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused attention backward: ``(dQ, dK, dV)`` for upstream gradient ``do`` (contiguous, input dtype)."""
    _validate(q, k, v, o, lse, do)
    if _interpreter_bf16(q):
        grads = attn_bwd(*_f32(q, k, v, o, lse, do), scale)
        return tuple(g.to(q.dtype) for g in grads)
    q, k, v, lse, do, delta = _saved(q, k, v, o, lse, do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _launch(_attn_bwd_dkdv_kernel, "dkdv", (q, k, v, do, lse, delta, dk, dv), q, k.shape[2], scale)
    _launch(_attn_bwd_dq_kernel, "dq", (q, k, v, do, lse, delta, dq), q, k.shape[2], scale)
    return dq, dk, dv


def attn_dbwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
    gq: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused attention double backward: ``(Qbar, Kbar, Vbar, Gbar)``, the gradients of
    ``<gq, dQ> + <gk, dK> + <gv, dV>`` with respect to ``(q, k, v, do)``. ``None`` cotangents count
    as zero. No gradient flows to ``o`` or ``lse`` (they are caches). Outputs are contiguous;
    ``Gbar`` has ``do``'s dtype, the others their input's."""
    _validate(q, k, v, o, lse, do)
    if _interpreter_bf16(q):
        qbar, kbar, vbar, gbar = attn_dbwd(*_f32(q, k, v, o, lse, do, gq, gk, gv), scale)
        return qbar.to(q.dtype), kbar.to(k.dtype), vbar.to(v.dtype), gbar.to(do.dtype)
    do_dtype = do.dtype
    gq, gk, gv = _like(gq, q, "gq"), _like(gk, k, "gk"), _like(gv, v, "gv")
    q, k, v, lse, do, delta = _saved(q, k, v, o, lse, do)
    row_stats = torch.empty((2,) + q.shape[:3], device=q.device, dtype=acc_dtype(q.dtype))
    r, c = row_stats[0], row_stats[1]
    qbar, kbar, vbar, gbar = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(do)
    _launch(_attn_dbwd_row_kernel, "dbwd_row", (q, k, v, do, gq, gk, gv, lse, delta, qbar, gbar, r, c),
            q, k.shape[2], scale)
    _launch(_attn_dbwd_col_kernel, "dbwd_col", (q, k, v, do, gq, gk, gv, lse, delta, r, c, kbar, vbar),
            q, k.shape[2], scale)
    return qbar, kbar, vbar, gbar.to(do_dtype)
