"""Triton kernels of the attention forward and first backward (FlashAttention-2 style).

Launched by the wrappers of ``fastebm.kernels.attention``; conventions (grid, strides, masks,
base-2 softmax) in ``fastebm.kernels.attention_tiles``. References: ``attn_fwd_ref`` and
``attn_bwd_ref`` of ``fastebm.kernels.attention_ref``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import (dot_t, ln2, load_row_stats, load_tile, probs, program_tile, scales, store_row,
                              store_tile)

# Sequence lengths are not specialised (do_not_specialize): Triton would otherwise compile a kernel
# per "N divisible by 16 / N == 1 / other", and they only enter masks and loop bounds.


# --------------------------------------------------------------------------------------------
# Forward. One program per (BLOCK_M rows of Q, head, batch). The Q tile stays resident; loop over
# K/V tiles of BLOCK_N keys with the online softmax in base 2 (running max m, running sum l,
# rescaled accumulator), then O = acc / l and lse = (m + log2 l) ln 2. Padded keys get score -inf.
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    scale_hi, scale_lo, H, NQ, NK,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    _, qk_scale = scales(scale_hi, scale_lo, ACC)
    offs_m, offs_d, h, b = program_tile(BLOCK_M, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        s = qk_scale * dot_t(q, k, DOT_PREC)
        if not EVEN_N:
            s = tl.where((offs_n < NK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    row = (b * H + h) * NQ
    store_tile(O + row * HEAD_DIM, acc / l_i[:, None], offs_m, offs_d, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    store_row(LSE + row, m_i * ln2(ACC) + tl.log(l_i), offs_m, NQ, EVEN_M)


# --------------------------------------------------------------------------------------------
# Backward.
# (1) delta pre-pass: one program per BLOCK_M rows: delta = rowsum(O * dO).
# (2) dK/dV kernel: one program per BLOCK_N keys; the K/V tile stays resident; loop over Q tiles
#     computing transposed tiles directly (no register-tile transposes):
#     P^T = exp2(qk_scale K Q^T - lse log2 e), dV += P^T dO, dS^T = P^T (V dO^T - delta),
#     dK += dS^T Q. Each program owns its dK/dV rows, so no atomics.
# (3) dQ kernel: one program per BLOCK_M rows; the Q tile stays resident; loop over K/V tiles:
#     dQ += dS K.
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["NQ"])
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od, stride_dob, stride_doh, stride_don, stride_dod,
    H, NQ,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr,
):
    offs_m, offs_d, h, b = program_tile(BLOCK_M, BLOCK_D)
    o = load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_on, stride_od, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod, NQ, HEAD_DIM, BLOCK_D,
                   EVEN_M)
    store_row(DELTA + (b * H + h) * NQ, tl.sum(o.to(ACC) * do.to(ACC), 1), offs_m, NQ, EVEN_M)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    scale_hi, scale_lo, H, NQ, NK,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    scale, qk_scale = scales(scale_hi, scale_lo, ACC)
    offs_n, offs_d, h, b = program_tile(BLOCK_N, BLOCK_D)
    k = load_tile(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    v = load_tile(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row = (b * H + h) * NQ

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
        do = load_tile(do_base, offs_m, offs_d, stride_don, stride_dod, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
        lse2, delta = load_row_stats(LSE, DELTA, row, offs_m, NQ, ACC, EVEN_M)
        p_t = probs(k, q, lse2[None, :], offs_m, NQ, qk_scale, DOT_PREC, EVEN_M)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        ds_t = p_t * (dot_t(v, do, DOT_PREC) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)

    col = (b * H + h) * NK * HEAD_DIM
    store_tile(DK + col, scale * dk, offs_n, offs_d, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    store_tile(DV + col, dv, offs_n, offs_d, NK, HEAD_DIM, BLOCK_D, EVEN_N)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    scale_hi, scale_lo, H, NQ, NK,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    scale, qk_scale = scales(scale_hi, scale_lo, ACC)
    offs_m, offs_d, h, b = program_tile(BLOCK_M, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod, NQ, HEAD_DIM, BLOCK_D,
                   EVEN_M)
    row = (b * H + h) * NQ
    lse2, delta = load_row_stats(LSE, DELTA, row, offs_m, NQ, ACC, EVEN_M)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        p = probs(q, k, lse2[:, None], offs_n, NK, qk_scale, DOT_PREC, EVEN_N)
        ds = p * (dot_t(do, v, DOT_PREC) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    store_tile(DQ + row * HEAD_DIM, scale * dq, offs_m, offs_d, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
