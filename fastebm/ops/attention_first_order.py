"""First-order-only attention backends: PyTorch SDPA and xformers' ``memory_efficient_attention``.

Both compute ``softmax(scale q k^T) v`` with fused kernels and have a backward whose own
derivative is missing (FlashAttention, memory-efficient and cuDNN kernels) or not guaranteed, so
the registry declares them ``max_order=1``: ``backend="auto"`` uses them only inside
``fastebm.ops.first_order_attention()``, and their outputs refuse a ``create_graph=True`` backward
(``fastebm.ops.attention_order.guard_first_order``).

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (no mask, no dropout). PyTorch
  picks the kernel: FlashAttention-2, memory-efficient or cuDNN on CUDA, its fused flash path on
  CPU, the math path otherwise (e.g. float64 on CUDA). Any device and floating dtype.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (an optional dependency, the
  ``xformers`` extra) in its ``(B, N, H, d)`` layout; xformers dispatches to FlashAttention-3/2 or
  CUTLASS kernels. CUDA only (it has no CPU kernel), float16/bfloat16/float32, head dims up to
  :data:`XFORMERS_MAX_HEAD_DIM`. xformers is imported only when a CUDA tensor asks for it, so CPU
  runs never import it.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["sdpa_attention", "sdpa_supports", "xformers_attention", "xformers_supports", "xformers_installed"]

XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# FlashAttention's limit; xformers' CUTLASS kernels go further, but ViT heads are 64 wide.
XFORMERS_MAX_HEAD_DIM = 256


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(scale q k^T) v`` by ``torch.nn.functional.scaled_dot_product_attention`` for q
    (B, H, Nq, d), k/v (B, H, Nk, d); output (B, H, Nq, d) in q's dtype. First-order only."""
    return F.scaled_dot_product_attention(q, k, v, scale=float(scale))


def sdpa_supports(q: Tensor) -> bool:
    """Floating-point tensors on any device (PyTorch falls back to its math path where no fused
    kernel fits)."""
    return q.is_floating_point()


def xformers_installed() -> bool:
    """Whether xformers can be found (not imported: importing it is deferred to the first CUDA use)."""
    return importlib.util.find_spec("xformers") is not None


def xformers_fits(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether xformers' attention kernels accept inputs of this device type, dtype and head dim."""
    return device_type == "cuda" and dtype in XFORMERS_DTYPES and 1 <= head_dim <= XFORMERS_MAX_HEAD_DIM


_XFORMERS_OPS = []  # the imported xformers.ops module, once (a list: no global statement needed)


def _xformers_ops():
    """``xformers.ops``, imported on first use; None when the import fails (logged once)."""
    if not _XFORMERS_OPS:
        try:
            import xformers.ops as xops
        except Exception as exc:  # a broken or mismatched install: the other backends stay
            logger.warning("xformers is installed but cannot be imported (%s); attention backend "
                           "'xformers' is unavailable", exc)
            xops = None
        _XFORMERS_OPS.append(xops)
    return _XFORMERS_OPS[0]


def xformers_supports(q: Tensor) -> bool:
    """CUDA tensors of float16/bfloat16/float32 with head dims 1..256, when xformers imports."""
    if not xformers_fits(q.device.type, q.dtype, q.shape[-1]):
        return False
    return _xformers_ops() is not None


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(scale q k^T) v`` by ``xformers.ops.memory_efficient_attention`` for q (B, H, Nq, d),
    k/v (B, H, Nk, d); output (B, H, Nq, d) (a transposed view) in q's dtype. First-order only.
    Raises RuntimeError when xformers cannot be imported."""
    xops = _xformers_ops()
    if xops is None:
        raise RuntimeError("attention backend 'xformers' needs xformers: pip install 'fastebm[xformers]'")

    def bmhk(t: Tensor) -> Tensor:
        t = t.transpose(1, 2)
        return t if t.stride(-1) == 1 else t.contiguous()  # xformers needs a unit stride in the head dim

    out = xops.memory_efficient_attention(bmhk(q), bmhk(k), bmhk(v), scale=float(scale))
    return out.transpose(1, 2)
