"""Triton kernels of the attention double backward: the row kernel and the column kernel.

Launched by ``fastebm.kernels.attention.attn_dbwd``; conventions (grid, strides, masks, base-2
softmax) in ``fastebm.kernels.attention_tiles``. Reference: ``attn_dbwd_ref`` (docs/design.md §5).
Per tile everything is recomputed from resident tiles:

    P = exp(s Q K^T - lse), dP = G V^T, U = s (gQ K^T + Q gK^T), W = G gV^T.

(1) row kernel: one program per BLOCK_M query rows; Q, G, gQ tiles resident.
    Pass 1 over K/V tiles: the row statistics
        r  = rowsum(P U),  c1 = rowsum(P (W + U (dP - delta))),  c2 = rowsum(P dP),
    then c = c1 - r c2 (= rowsum(P Pbar) since Pbar = W + U (dP - delta) - r dP).
    Pass 2 over K/V tiles, now that r and c are known:
        dS = P (dP - delta), Sbar = P (Pbar - c) (sbar_tile), Dd = P (U - r),
        Qbar += dS gK + Sbar K (times s),  Gbar += P gV + Dd V.
    r and c are written out (B*H*Nq floats each) for the column kernel.
(2) column kernel: one program per BLOCK_N keys; K, V, gK, gV tiles resident; loop over Q tiles
    with the row statistics from (1), computing the transposed tiles P^T = exp2(qk_scale K Q^T - lse
    log2 e), U^T = s (K gQ^T + gK Q^T), dP^T = V G^T, W^T = gV G^T directly (no register-tile
    transposes; the dots' rows are the resident keys):
        Kbar += dS^T gQ + Sbar^T Q (times s),  Vbar += Dd^T G,
    each product consumed as soon as it is formed (fewer live tiles, fewer registers).
Both kernels own their output rows, so no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import (dot_t, load_row, load_row_stats, load_tile, probs, program_tile, sbar_tile, scales,
                              store_row, store_tile, u_tile)


@triton.jit
def _query_tiles(q_base, g_base, gq_base, offs_m, offs_d, stride_qn, stride_qd, stride_gn, stride_gd, stride_gqn,
                 stride_gqd, NQ, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr):
    # Q, G (= dO) and gQ rows offs_m of one (batch, head): the query side of every product.
    q = load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    g = load_tile(g_base, offs_m, offs_d, stride_gn, stride_gd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    gq = load_tile(gq_base, offs_m, offs_d, stride_gqn, stride_gqd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    return q, g, gq


@triton.jit
def _key_tiles(k_base, v_base, gk_base, gv_base, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
               stride_gkn, stride_gkd, stride_gvn, stride_gvd, NK, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN_N: tl.constexpr):
    # K, V, gK and gV rows offs_n of one (batch, head): the key side of every product.
    k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    gk = load_tile(gk_base, offs_n, offs_d, stride_gkn, stride_gkd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    gv = load_tile(gv_base, offs_n, offs_d, stride_gvn, stride_gvd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    return k, v, gk, gv


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_dbwd_row_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, QBAR, GBAR, R, C,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_gqb, stride_gqh, stride_gqn, stride_gqd, stride_gkb, stride_gkh, stride_gkn, stride_gkd,
    stride_gvb, stride_gvh, stride_gvn, stride_gvd,
    scale_hi, scale_lo, H, NQ, NK,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    scale, qk_scale = scales(scale_hi, scale_lo, ACC)
    offs_m, offs_d, h, b = program_tile(BLOCK_M, BLOCK_D)
    q, g, gq = _query_tiles(Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                            GQ + b * stride_gqb + h * stride_gqh, offs_m, offs_d, stride_qn, stride_qd, stride_don,
                            stride_dod, stride_gqn, stride_gqd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    row = (b * H + h) * NQ
    lse2, delta = load_row_stats(LSE, DELTA, row, offs_m, NQ, ACC, EVEN_M)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    gk_base = GK + b * stride_gkb + h * stride_gkh
    gv_base = GV + b * stride_gvb + h * stride_gvh

    # Pass 1: row statistics r and c.
    r = tl.zeros([BLOCK_M], ACC)
    c1 = tl.zeros([BLOCK_M], ACC)
    c2 = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, gk, gv = _key_tiles(k_base, v_base, gk_base, gv_base, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                  stride_vd, stride_gkn, stride_gkd, stride_gvn, stride_gvd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        p = probs(q, k, lse2[:, None], offs_n, NK, qk_scale, DOT_PREC, EVEN_N)
        u = u_tile(q, gq, k, gk, scale, DOT_PREC)
        dp = dot_t(g, v, DOT_PREC)
        r += tl.sum(p * u, 1)
        c1 += tl.sum(p * (dot_t(g, gv, DOT_PREC) + u * (dp - delta[:, None])), 1)
        c2 += tl.sum(p * dp, 1)
    c = c1 - r * c2
    rdc = r * delta + c

    # Pass 2: Qbar and Gbar.
    qbar = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gbar = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, gk, gv = _key_tiles(k_base, v_base, gk_base, gv_base, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                  stride_vd, stride_gkn, stride_gkd, stride_gvn, stride_gvd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        # All products first, then the accumulations: fewer spills here than the column kernel's
        # order (compile_check on sm_90: none in bf16 d = 64, about half in fp32).
        p = probs(q, k, lse2[:, None], offs_n, NK, qk_scale, DOT_PREC, EVEN_N)
        dp_c = dot_t(g, v, DOT_PREC) - delta[:, None]
        u_r = u_tile(q, gq, k, gk, scale, DOT_PREC) - r[:, None]
        sbar = sbar_tile(p, dot_t(g, gv, DOT_PREC), u_r, dp_c, rdc[:, None])
        qbar += tl.dot((p * dp_c).to(gk.dtype), gk, input_precision=DOT_PREC)  # dS gK
        qbar += tl.dot(sbar.to(k.dtype), k, input_precision=DOT_PREC)  # Sbar K
        gbar += tl.dot(p.to(gv.dtype), gv, input_precision=DOT_PREC)  # P gV
        gbar += tl.dot((p * u_r).to(v.dtype), v, input_precision=DOT_PREC)  # Dd V

    store_tile(QBAR + row * HEAD_DIM, scale * qbar, offs_m, offs_d, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    store_tile(GBAR + row * HEAD_DIM, gbar, offs_m, offs_d, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    store_row(R + row, r, offs_m, NQ, EVEN_M)
    store_row(C + row, c, offs_m, NQ, EVEN_M)


@triton.jit(do_not_specialize=["NQ", "NK"])
def _attn_dbwd_col_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, R, C, KBAR, VBAR,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_gqb, stride_gqh, stride_gqn, stride_gqd, stride_gkb, stride_gkh, stride_gkn, stride_gkd,
    stride_gvb, stride_gvh, stride_gvn, stride_gvd,
    scale_hi, scale_lo, H, NQ, NK,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    scale, qk_scale = scales(scale_hi, scale_lo, ACC)
    offs_n, offs_d, h, b = program_tile(BLOCK_N, BLOCK_D)
    k, v, gk, gv = _key_tiles(K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                              GK + b * stride_gkb + h * stride_gkh, GV + b * stride_gvb + h * stride_gvh, offs_n, offs_d,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_gkn, stride_gkd, stride_gvn, stride_gvd,
                              NK, HEAD_DIM, BLOCK_D, EVEN_N)
    q_base = Q + b * stride_qb + h * stride_qh
    g_base = DO + b * stride_dob + h * stride_doh
    gq_base = GQ + b * stride_gqb + h * stride_gqh
    row = (b * H + h) * NQ

    kbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    vbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, g, gq = _query_tiles(q_base, g_base, gq_base, offs_m, offs_d, stride_qn, stride_qd, stride_don, stride_dod,
                                stride_gqn, stride_gqd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
        lse2, delta = load_row_stats(LSE, DELTA, row, offs_m, NQ, ACC, EVEN_M)
        r = load_row(R + row, offs_m, NQ, EVEN_M)
        rdc = r * delta + load_row(C + row, offs_m, NQ, EVEN_M)
        # Each product is consumed as soon as it is formed: at most four (BLOCK_N, BLOCK_M) tiles
        # live. Chosen by compile_check on sm_90: this order has no spills in bf16 d = 64 with
        # 64-row query tiles, where the row kernel's order (all products first) spills.
        p_t = probs(k, q, lse2[None, :], offs_m, NQ, qk_scale, DOT_PREC, EVEN_M)
        dp_c = dot_t(v, g, DOT_PREC) - delta[None, :]
        kbar += tl.dot((p_t * dp_c).to(gq.dtype), gq, input_precision=DOT_PREC)  # dS^T gQ
        u_r = u_tile(gk, k, gq, q, scale, DOT_PREC) - r[None, :]
        vbar += tl.dot((p_t * u_r).to(g.dtype), g, input_precision=DOT_PREC)  # Dd^T G
        sbar_t = sbar_tile(p_t, dot_t(gv, g, DOT_PREC), u_r, dp_c, rdc[None, :])
        kbar += tl.dot(sbar_t.to(q.dtype), q, input_precision=DOT_PREC)  # Sbar^T Q

    col = (b * H + h) * NK * HEAD_DIM
    store_tile(KBAR + col, scale * kbar, offs_n, offs_d, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    store_tile(VBAR + col, vbar, offs_n, offs_d, NK, HEAD_DIM, BLOCK_D, EVEN_N)
