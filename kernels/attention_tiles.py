"""Device helpers shared by the attention kernels (inlined by Triton).

Conventions of every kernel in ``fastebm.kernels.attention``:

- Grid ``(tiles, H, B)``: the tile index is the fastest axis, so consecutive programs work on one
  (batch, head) and share its K/V (or Q) tiles from L2; :func:`program_tile` returns the program's
  rows, the head-dim columns and ``h``, ``b`` as int64 (offsets of large tensors overflow int32).
- Input tensors arrive with their four strides ``(b, h, n, d)``, so views (the ViT's q/k/v are
  slices of one qkv projection) are read in place; the JIT specialises a unit stride to a constant.
  Outputs and row statistics (``LSE``, ``DELTA``, ``R``, ``C``) are contiguous, allocated by the wrappers.
- ``HEAD_DIM`` is a constexpr; head-dim columns beyond it (up to ``BLOCK_D``) are masked only when
  ``HEAD_DIM < BLOCK_D``, and rows only on a ragged launch (``EVEN_*`` false: the length is not a
  multiple of the tile).
- Softmax in base 2: ``exp2(qk_scale * q.k - lse * log2 e)`` with ``qk_scale = scale * log2 e``
  (what ``exp`` costs anyway, minus one multiply per element).
"""
from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

# log2(e) and ln(2) as float32 hi + lo pairs: their sum in float64 is accurate to ~1e-16, so
# float64 runs keep float64 accuracy (a float literal in a kernel is a float32 constant).
_LOG2E, _LN2 = 1.4426950408889634, 0.6931471805599453
LOG2E_HI = tl.constexpr(float(np.float32(_LOG2E)))
LOG2E_LO = tl.constexpr(float(np.float32(_LOG2E - float(np.float32(_LOG2E)))))
LN2_HI = tl.constexpr(float(np.float32(_LN2)))
LN2_LO = tl.constexpr(float(np.float32(_LN2 - float(np.float32(_LN2)))))


@triton.jit
def acc_const(hi, lo, ACC: tl.constexpr):
    # A constant (or the scale) that arrives as two float32 halves, summed in the accumulation dtype.
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def log2e(ACC: tl.constexpr):
    return acc_const(LOG2E_HI, LOG2E_LO, ACC)


@triton.jit
def ln2(ACC: tl.constexpr):
    return acc_const(LN2_HI, LN2_LO, ACC)


@triton.jit
def scales(scale_hi, scale_lo, ACC: tl.constexpr):
    # The softmax scale s, and qk_scale = s log2 e that turns scores into base-2 exponents.
    scale = acc_const(scale_hi, scale_lo, ACC)
    return scale, scale * log2e(ACC)


@triton.jit
def program_tile(BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # (rows of this program's resident tile, head-dim columns, head, batch) on the (tiles, H, B) grid.
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    return tile * BLOCK + tl.arange(0, BLOCK), tl.arange(0, BLOCK_D), h, b


@triton.jit
def load_tile(base, offs_row, offs_d, stride_n, stride_d, N,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr):
    # Rows offs_row of an (N, HEAD_DIM) matrix; out-of-range rows and padded columns read 0.
    ptrs = base + offs_row[:, None] * stride_n + offs_d[None, :] * stride_d
    if EVEN_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=offs_row[:, None] < N, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_row[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return x


@triton.jit
def store_tile(base, x, offs_row, offs_d, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr):
    # Into a contiguous (N, HEAD_DIM) matrix (every output the wrappers allocate).
    ptrs = base + offs_row[:, None] * HEAD_DIM + offs_d[None, :]
    x = x.to(base.dtype.element_ty)
    if EVEN_ROWS:
        if HEAD_DIM == BLOCK_D:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=offs_d[None, :] < HEAD_DIM)
    else:
        if HEAD_DIM == BLOCK_D:
            tl.store(ptrs, x, mask=offs_row[:, None] < N)
        else:
            tl.store(ptrs, x, mask=(offs_row[:, None] < N) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def load_row(base, offs_row, N, EVEN_ROWS: tl.constexpr):
    if EVEN_ROWS:
        x = tl.load(base + offs_row)
    else:
        x = tl.load(base + offs_row, mask=offs_row < N, other=0.0)
    return x


@triton.jit
def store_row(base, x, offs_row, N, EVEN_ROWS: tl.constexpr):
    if EVEN_ROWS:
        tl.store(base + offs_row, x)
    else:
        tl.store(base + offs_row, x, mask=offs_row < N)


@triton.jit
def dot_t(a, b, DOT_PREC: tl.constexpr):
    # a b^T; b^T is a shared-memory operand layout, not a register-tile transpose.
    return tl.dot(a, tl.trans(b), input_precision=DOT_PREC)


@triton.jit
def load_row_stats(LSE, DELTA, row, offs_m, NQ, ACC: tl.constexpr, EVEN_M: tl.constexpr):
    # (lse log2 e, delta) of query rows offs_m: what the base-2 probabilities subtract, and rowsum(O dO).
    lse2 = load_row(LSE + row, offs_m, NQ, EVEN_M) * log2e(ACC)
    return lse2, load_row(DELTA + row, offs_m, NQ, EVEN_M)


@triton.jit
def probs(a, b, lse2, offs_col, NC, qk_scale, DOT_PREC: tl.constexpr, EVEN_COLS: tl.constexpr):
    # The softmax probabilities recomputed from the saved lse: P = exp2(qk_scale Q K^T - lse2[:, None])
    # for (a, b) = (Q, K), or P^T for (a, b) = (K, Q) and lse2[None, :] (the caller broadcasts lse2).
    # Only the columns (offs_col < NC) are masked: padded rows are never stored. Padded rows and
    # columns read zeros, but exp2(0 - lse) is not 0 (and inf for lse < ~-88 in float32), so
    # probabilities of padded pairs are zeroed explicitly; no work on an even launch.
    p = tl.exp2(qk_scale * dot_t(a, b, DOT_PREC) - lse2)
    if not EVEN_COLS:
        p = tl.where((offs_col < NC)[None, :], p, 0.0)
    return p


@triton.jit
def u_tile(a, ga, b, gb, scale, DOT_PREC: tl.constexpr):
    # s (ga b^T + a gb^T): U = s (gQ K^T + Q gK^T), the scores' derivative along the cotangents
    # (docs/design.md §5), for (a, ga, b, gb) = (Q, gQ, K, gK); U^T = s (K gQ^T + gK Q^T) for
    # (gK, K, gQ, Q) (the form is symmetric in swapping each tile with its cotangent). The column
    # kernel passes that order: it sums K gQ^T first, which spills less there (compile_check, sm_90).
    return scale * (dot_t(ga, b, DOT_PREC) + dot_t(a, gb, DOT_PREC))


@triton.jit
def sbar_tile(p, w, u_r, dp_c, rdc):
    # Sbar = P (Pbar - c) with Pbar = W + U (dP - delta) - r dP (docs/design.md §5), regrouped as
    # P (W + (U - r)(dP - delta) - (r delta + c)) so that only P, W, U - r and dP - delta are live
    # (the same code serves P tiles, with row statistics x[:, None], and P^T tiles, x[None, :]).
    return p * (w + u_r * dp_c - rdc)
