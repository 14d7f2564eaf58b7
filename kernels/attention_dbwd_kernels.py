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

from .attention_tiles import (acc_const, dot_t, load_row, load_tile, log2e, mask_tile, program_ids, sbar_tile,
                              store_row, store_tile)


@triton.jit
def _probs(q, k, lse2, offs_m, NQ, offs_n, NK, qk_scale, DOT_PREC: tl.constexpr, EVEN_N: tl.constexpr):
    # P of one (query tile, key tile) pair; padded keys get P = 0 (padded query rows are never stored).
    p = tl.exp2(qk_scale * dot_t(q, k, DOT_PREC) - lse2[:, None])
    return mask_tile(p, offs_m, NQ, offs_n, NK, True, EVEN_N)


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
    scale = acc_const(scale_hi, scale_lo, ACC)
    qk_scale = scale * log2e(ACC)
    tile, h, b = program_ids()
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
    g = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod, NQ, HEAD_DIM, BLOCK_D,
                  EVEN_M)
    gq = load_tile(GQ + b * stride_gqb + h * stride_gqh, offs_m, offs_d, stride_gqn, stride_gqd, NQ, HEAD_DIM, BLOCK_D,
                   EVEN_M)
    row = (b * H + h) * NQ
    lse2 = load_row(LSE + row, offs_m, NQ, EVEN_M) * log2e(ACC)
    delta = load_row(DELTA + row, offs_m, NQ, EVEN_M)
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
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        gk = load_tile(gk_base, offs_n, offs_d, stride_gkn, stride_gkd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        gv = load_tile(gv_base, offs_n, offs_d, stride_gvn, stride_gvd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        p = _probs(q, k, lse2, offs_m, NQ, offs_n, NK, qk_scale, DOT_PREC, EVEN_N)
        u = scale * (dot_t(gq, k, DOT_PREC) + dot_t(q, gk, DOT_PREC))
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
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        gk = load_tile(gk_base, offs_n, offs_d, stride_gkn, stride_gkd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        gv = load_tile(gv_base, offs_n, offs_d, stride_gvn, stride_gvd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
        # All products first, then the accumulations: fewer spills here than the column kernel's
        # order (compile_check on sm_90: none in bf16 d = 64, about half in fp32).
        p = _probs(q, k, lse2, offs_m, NQ, offs_n, NK, qk_scale, DOT_PREC, EVEN_N)
        dp_c = dot_t(g, v, DOT_PREC) - delta[:, None]
        u_r = scale * (dot_t(gq, k, DOT_PREC) + dot_t(q, gk, DOT_PREC)) - r[:, None]
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
    scale = acc_const(scale_hi, scale_lo, ACC)
    qk_scale = scale * log2e(ACC)
    tile, h, b = program_ids()
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    v = load_tile(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    gk = load_tile(GK + b * stride_gkb + h * stride_gkh, offs_n, offs_d, stride_gkn, stride_gkd, NK, HEAD_DIM, BLOCK_D,
                   EVEN_N)
    gv = load_tile(GV + b * stride_gvb + h * stride_gvh, offs_n, offs_d, stride_gvn, stride_gvd, NK, HEAD_DIM, BLOCK_D,
                   EVEN_N)
    q_base = Q + b * stride_qb + h * stride_qh
    g_base = DO + b * stride_dob + h * stride_doh
    gq_base = GQ + b * stride_gqb + h * stride_gqh
    row = (b * H + h) * NQ

    kbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    vbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
        g = load_tile(g_base, offs_m, offs_d, stride_don, stride_dod, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
        gq = load_tile(gq_base, offs_m, offs_d, stride_gqn, stride_gqd, NQ, HEAD_DIM, BLOCK_D, EVEN_M)
        lse2 = load_row(LSE + row, offs_m, NQ, EVEN_M) * log2e(ACC)
        delta = load_row(DELTA + row, offs_m, NQ, EVEN_M)
        r = load_row(R + row, offs_m, NQ, EVEN_M)
        rdc = r * delta + load_row(C + row, offs_m, NQ, EVEN_M)
        # Each product is consumed as soon as it is formed: at most four (BLOCK_N, BLOCK_M) tiles
        # live. Chosen by compile_check on sm_90: this order has no spills in bf16 d = 64 with
        # 64-row query tiles, where the row kernel's order (all products first) spills.
        p_t = tl.exp2(qk_scale * dot_t(k, q, DOT_PREC) - lse2[None, :])
        p_t = mask_tile(p_t, offs_n, NK, offs_m, NQ, True, EVEN_M)  # padded key rows are never stored
        dp_c = dot_t(v, g, DOT_PREC) - delta[None, :]
        kbar += tl.dot((p_t * dp_c).to(gq.dtype), gq, input_precision=DOT_PREC)  # dS^T gQ
        u_r = scale * (dot_t(k, gq, DOT_PREC) + dot_t(gk, q, DOT_PREC)) - r[None, :]
        vbar += tl.dot((p_t * u_r).to(g.dtype), g, input_precision=DOT_PREC)  # Dd^T G
        sbar_t = sbar_tile(p_t, dot_t(gv, g, DOT_PREC), u_r, dp_c, rdc[None, :])
        kbar += tl.dot(sbar_t.to(q.dtype), q, input_precision=DOT_PREC)  # Sbar^T Q

    col = (b * H + h) * NK * HEAD_DIM
    store_tile(KBAR + col, scale * kbar, offs_n, offs_d, NK, HEAD_DIM, BLOCK_D, EVEN_N)
    store_tile(VBAR + col, vbar, offs_n, offs_d, NK, HEAD_DIM, BLOCK_D, EVEN_N)
