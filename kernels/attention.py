"""Triton kernels for attention with an exact double backward (``fastebm.kernels.attention``).

Three stages, each a plain function on tensors (no autograd inside, outputs allocated with
``torch.empty`` and always contiguous, inputs read in place through their strides), so that both an
``autograd.Function`` (eager engine) and ``torch.library.custom_op``s (explicit engine) can call them:

- ``attn_fwd(q, k, v, scale) -> (o, lse)``
- ``attn_bwd(q, k, v, o, lse, do, scale, return_delta=False) -> (dq, dk, dv[, delta])``
- ``attn_dbwd(q, k, v, o, lse, do, gq, gk, gv, scale, delta=None) -> (qbar, kbar, vbar, gbar)``

Shapes: ``q`` (B, H, Nq, d), ``k``/``v`` (B, H, Nk, d), any strides; Nq may differ from Nk.
``lse`` and ``delta`` = rowsum(O * dO) are (B, H, Nq) in float32 (float64 for float64 inputs);
the backward can hand its ``delta`` to the double backward, which otherwise recomputes it. Inputs
may be float16, bfloat16, float32 or float64 (the last mostly for gradcheck); all element-wise work
and every matmul accumulate in float32 (float64 for float64 inputs). float32 matmuls use 3xTF32 on
tensor cores (about fp32 accuracy; see ``_dot_precision``), so fp32 results match a float64
reference to ~1e-6 relative. The head dimension (1..128) is a compile-time constant, padded to a
power of two >= 16 with masking; tiles are masked only on ragged launches (a length that is not a
multiple of the tile). Tile sizes come from ``fastebm.kernels.attention_config`` (one policy, a
table that ``python -m fastebm.kernels.tune`` regenerates); the kernels are in
``attention_fwd_bwd_kernels`` and ``attention_dbwd_kernels``, their shared conventions in
``attention_tiles``.

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
from .attention_config import COLUMN_KERNELS, KERNELS, launch_config
from .attention_dbwd_kernels import _attn_dbwd_col_kernel, _attn_dbwd_row_kernel
from .attention_fwd_bwd_kernels import (_attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,
                                        _attn_fwd_kernel)
from .attention_ref import attn_bwd_ref, attn_dbwd_ref, attn_fwd_ref

Tensor = torch.Tensor

__all__ = ["attn_fwd", "attn_bwd", "attn_dbwd", "attn_bwd_delta", "attn_fwd_ref", "attn_bwd_ref", "attn_dbwd_ref",
           "MAX_HEAD_DIM", "KERNELS", "launch_config", "launch_options"]

# Triton picks the interpreter when a kernel is decorated, from the environment at import time:
# True when these kernels run in the interpreter (CPU tensors allowed, nothing compiled).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y (heads) and z (batch)

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


def _check_grid(q: Tensor) -> None:
    B, H = q.shape[:2]
    if q.is_cuda and max(B, H) > MAX_GRID_YZ:
        raise ValueError(f"batch {B} x heads {H}: each must be <= {MAX_GRID_YZ} (CUDA grid limit); split the batch")


def _like(t: Optional[Tensor], ref: Tensor, name: str) -> Tensor:
    """``t`` in ``ref``'s dtype (any strides); ``None`` (a zero cotangent) becomes zeros like ``ref``."""
    if t is None:
        return torch.zeros(ref.shape, dtype=ref.dtype, device=ref.device)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    return t.to(dtype=ref.dtype)


def _row_stat(t: Tensor, q: Tensor, name: str) -> Tensor:
    """A (B, H, Nq) row statistic (``lse``, ``delta``) as the kernels read it: contiguous, accumulation dtype."""
    if t.shape != q.shape[:3]:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(q.shape[:3])}")
    return t.to(acc_dtype(q.dtype)).contiguous()


def _empty(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    # Outputs are always contiguous (the kernels store them so; the custom ops' fake
    # implementations promise it), whatever the inputs' strides.
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def launch_options(dtype: torch.dtype, head_dim: int, nq: int, nk: int, kernel: str, *, on_gpu: bool) -> dict:
    """Every keyword a launch of ``kernel`` passes: the constexprs (``HEAD_DIM``, ``ACC``, ``DOT_PREC``,
    ``BLOCK_M/N/D``, ``EVEN_M``/``EVEN_N``: no row masks when Nq/Nk is a multiple of the tile) and, on
    a GPU, ``num_warps``/``num_stages``. The one place that turns the block-size policy
    (``attention_config.launch_config``) into launch arguments; ``compile_check`` uses it too."""
    cfg = launch_config(dtype, head_dim, kernel, on_gpu=on_gpu, seq_len=max(nq, nk))
    return dict(cfg, HEAD_DIM=head_dim, ACC=_tl_acc(dtype), DOT_PREC=_dot_precision(dtype),
                EVEN_M=nq % cfg["BLOCK_M"] == 0, EVEN_N=nk % cfg["BLOCK_N"] == 0)


def _on_gpu(q: Tensor) -> bool:
    return q.is_cuda and not INTERPRETED


def _strides(*ts: Tensor) -> list:
    return [s for t in ts for s in t.stride()]


def _launch(kernel, name: str, strided: tuple, others: tuple, q: Tensor, nk: int, scale: float) -> None:
    """Runs one of the five main kernels (configuration ``name``) on a (tiles, H, B) grid: tiles of
    BLOCK_N keys for the column kernels, of BLOCK_M query rows for the others. ``strided`` tensors
    are passed with their strides, ``others`` (row statistics, outputs) are contiguous."""
    B, H, NQ, D = q.shape
    opts = launch_options(q.dtype, D, NQ, nk, name, on_gpu=_on_gpu(q))
    tiles = triton.cdiv(nk, opts["BLOCK_N"]) if name in COLUMN_KERNELS else triton.cdiv(NQ, opts["BLOCK_M"])
    kernel[(tiles, H, B)](*strided, *others, *_strides(*strided), *_scale_parts(scale), H, NQ, nk, **opts)


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
    _check_grid(q)
    if _interpreter_bf16(q):
        o, lse = attn_fwd(*_f32(q, k, v), scale)
        return o.to(q.dtype), lse
    o = _empty(q.shape, q)
    lse = _empty(q.shape[:3], q, acc_dtype(q.dtype))
    _launch(_attn_fwd_kernel, "fwd", (q, k, v), (o, lse), q, k.shape[2], scale)
    return o, lse


def attn_bwd_delta(o: Tensor, do: Tensor) -> Tensor:
    """``delta = rowsum(O * dO)``, (B, H, Nq) in the accumulation dtype of ``o``: the first
    backward's row statistic (docs/design.md §5). ``o`` and ``do`` are (B, H, Nq, d), any strides."""
    B, H, NQ, D = o.shape
    delta = _empty((B, H, NQ), o, acc_dtype(o.dtype))
    opts = launch_options(o.dtype, D, NQ, NQ, "dq", on_gpu=_on_gpu(o))
    _attn_bwd_delta_kernel[(triton.cdiv(NQ, opts["BLOCK_M"]), H, B)](
        o, do, delta, *_strides(o, do), H, NQ,
        HEAD_DIM=D, ACC=opts["ACC"], BLOCK_M=opts["BLOCK_M"], BLOCK_D=opts["BLOCK_D"], EVEN_M=opts["EVEN_M"],
    )
    return delta


def _saved(q: Tensor, o: Tensor, lse: Tensor, do: Tensor, delta: Optional[Tensor]):
    """``lse`` and ``delta`` (computed unless given) as the kernels read them, and ``do`` in q's
    dtype (strides kept)."""
    do = do.to(q.dtype)
    delta = attn_bwd_delta(o.to(q.dtype), do) if delta is None else _row_stat(delta, q, "delta")
    return _row_stat(lse, q, "lse"), do, delta


def attn_bwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, scale: float, return_delta: bool = False
):
    """Fused attention backward: ``(dQ, dK, dV)`` (contiguous, input dtype) for upstream gradient
    ``do``; with ``return_delta`` also ``delta = rowsum(O * dO)`` ((B, H, Nq), accumulation dtype),
    which :func:`attn_dbwd` can reuse instead of recomputing it."""
    _validate(q, k, v, o, lse, do)
    _check_grid(q)
    if _interpreter_bf16(q):
        dq, dk, dv, delta = attn_bwd(*_f32(q, k, v, o, lse, do), scale, return_delta=True)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
        return (*grads, delta) if return_delta else grads
    lse, do, delta = _saved(q, o, lse, do, None)
    dq, dk, dv = _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)
    _launch(_attn_bwd_dkdv_kernel, "dkdv", (q, k, v, do), (lse, delta, dk, dv), q, k.shape[2], scale)
    _launch(_attn_bwd_dq_kernel, "dq", (q, k, v, do), (lse, delta, dq), q, k.shape[2], scale)
    return (dq, dk, dv, delta) if return_delta else (dq, dk, dv)


def attn_dbwd(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
    gq: Optional[Tensor], gk: Optional[Tensor], gv: Optional[Tensor], scale: float, delta: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused attention double backward: ``(Qbar, Kbar, Vbar, Gbar)``, the gradients of
    ``<gq, dQ> + <gk, dK> + <gv, dV>`` with respect to ``(q, k, v, do)``. ``None`` cotangents count
    as zero. ``delta`` (B, H, Nq) is the backward's ``rowsum(O * dO)`` (``attn_bwd(...,
    return_delta=True)``), recomputed from ``o`` and ``do`` when not given. No gradient flows to
    ``o``, ``lse`` or ``delta`` (they are caches). Outputs are contiguous; ``Gbar`` has ``do``'s
    dtype, the others their input's."""
    _validate(q, k, v, o, lse, do)
    _check_grid(q)
    if _interpreter_bf16(q):
        qbar, kbar, vbar, gbar = attn_dbwd(*_f32(q, k, v, o, lse, do, gq, gk, gv), scale,
                                           delta=None if delta is None else delta.float())
        return qbar.to(q.dtype), kbar.to(k.dtype), vbar.to(v.dtype), gbar.to(do.dtype)
    do_dtype = do.dtype
    gq, gk, gv = _like(gq, q, "gq"), _like(gk, k, "gk"), _like(gv, v, "gv")
    lse, do, delta = _saved(q, o, lse, do, delta)
    row_stats = _empty((2,) + q.shape[:3], q, acc_dtype(q.dtype))
    r, c = row_stats[0], row_stats[1]
    qbar, kbar, vbar, gbar = _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v), _empty(do.shape, do)
    strided = (q, k, v, do, gq, gk, gv)
    _launch(_attn_dbwd_row_kernel, "dbwd_row", strided, (lse, delta, qbar, gbar, r, c), q, k.shape[2], scale)
    _launch(_attn_dbwd_col_kernel, "dbwd_col", strided, (lse, delta, r, c, kbar, vbar), q, k.shape[2], scale)
    return qbar, kbar, vbar, gbar.to(do_dtype)
