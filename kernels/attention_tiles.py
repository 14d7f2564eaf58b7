"""Device helpers shared by the attention kernels (inlined by Triton).

Conventions of every kernel in ``fastebm.kernels.attention``:

- Grid ``(tiles, H, B)``: the tile index is the fastest axis, so consecutive programs work on one
  (batch, head) and share its K/V (or Q) tiles from L2; :func:`program_ids` returns
  ``(tile, h, b)`` with ``h`` and ``b`` as int64 (offsets of large tensors overflow int32).
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
def program_ids():
    return tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)


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
def mask_tile(x, offs_row, NR, offs_col, NC, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    # x where (row, col) is inside (NR, NC), else 0; no work on an even launch. Padded rows/columns
    # read zeros, but exp2(0 - lse) is not 0 (and inf for lse < ~-88 in float32), so probabilities
    # of padded pairs are zeroed explicitly.
    if EVEN_ROWS:
        if not EVEN_COLS:
            x = tl.where((offs_col < NC)[None, :], x, 0.0)
    else:
        if EVEN_COLS:
            x = tl.where((offs_row < NR)[:, None], x, 0.0)
        else:
            x = tl.where((offs_row < NR)[:, None] & (offs_col < NC)[None, :], x, 0.0)
    return x


@triton.jit
def dot_t(a, b, DOT_PREC: tl.constexpr):
    # a b^T; b^T is a shared-memory operand layout, not a register-tile transpose.
    return tl.dot(a, tl.trans(b), input_precision=DOT_PREC)


@triton.jit
def sbar_tile(p, w, u_r, dp_c, rdc):
    # Sbar = P (Pbar - c) with Pbar = W + U (dP - delta) - r dP (docs/design.md §5), regrouped as
    # P (W + (U - r)(dP - delta) - (r delta + c)) so that only P, W, U - r and dP - delta are live
    # (the same code serves P tiles, with row statistics x[:, None], and P^T tiles, x[None, :]).
    return p * (w + u_r * dp_c - rdc)
