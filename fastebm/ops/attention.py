"""``fastebm.ops.attention``: scaled dot-product attention with a double backward.

Backends form a small registry. ``math`` (always present) is plain PyTorch ops, so autograd
differentiates it to any order; it is the reference and the fallback. The fused Triton backend
registers itself here when ``fastebm.ops.triton_attention`` can be imported.

Backend choice for ``backend="auto"``: the environment variable ``FASTEBM_ATTENTION_BACKEND``
(``triton`` | ``math``) if set, else Triton for CUDA tensors when available, else ``math``.
``resolve_backend`` tells which one a call would use.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
ENV_VAR = "FASTEBM_ATTENTION_BACKEND"


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    # Whether the backend can run on tensors like this one (device, dtype).
    supports: Callable[[Tensor], bool]


_BACKENDS: Dict[str, AttentionBackend] = {}
_logged_choices: set = set()


def register_backend(name: str, fn, supports=lambda q: True) -> None:
    """Adds (or replaces) an attention backend ``fn(q, k, v, scale) -> out``."""
    _BACKENDS[name] = AttentionBackend(name, fn, supports)


def available_backends():
    _load_optional_backends()
    return sorted(_BACKENDS)


def math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Reference attention from plain differentiable ops (softmax in fp32 for half inputs)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    return torch.matmul(p.to(v.dtype), v)


register_backend("math", math_attention)

_optional_loaded = False


def _load_optional_backends() -> None:
    """Imports the fused backends once; each registers itself if its dependencies import."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    try:
        from . import triton_attention  # noqa: F401  (registers "triton")
    except ImportError as exc:  # triton missing or too old: the math path stays
        logger.debug("Triton attention unavailable: %s", exc)


def resolve_backend(q: Tensor, backend: str = "auto") -> str:
    """The backend name a call ``attention(q, ..., backend=backend)`` would use."""
    _load_optional_backends()
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced:
            backend = forced
        elif "triton" in _BACKENDS and q.is_cuda and _BACKENDS["triton"].supports(q):
            backend = "triton"
        else:
            backend = "math"
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; available: {', '.join(sorted(_BACKENDS))} "
            f"(set {ENV_VAR} or pass backend= one of those)"
        )
    if not _BACKENDS[backend].supports(q):
        raise ValueError(
            f"attention backend {backend!r} cannot run on {q.device.type} {q.dtype} tensors with head dim "
            f"{q.shape[-1]} (the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU, and head dims "
            f"up to 128); use backend='math' or 'auto' (and unset {ENV_VAR} if it is set)"
        )
    key = (backend, q.device.type, q.dtype)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.debug("attention backend %s for %s %s tensors", backend, q.device.type, q.dtype)
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """``softmax(scale * q k^T) v`` for ``q`` (B, H, Nq, d) and ``k``, ``v`` (B, H, Nk, d).

    Differentiable twice (``create_graph=True`` through the backward is exact) on every backend.
    ``scale`` defaults to ``d ** -0.5``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D (B, H, N, d) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}; "
            "need q (B,H,Nq,d), k and v (B,H,Nk,d)"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_backend(q, backend)
    return _BACKENDS[name].fn(q, k, v, float(scale))
