"""The registry of attention backends and the choice among them (``resolve_backend``).

A backend is ``fn(q, k, v, scale) -> out`` plus ``supports(q) -> bool`` (whether it can run on
tensors like ``q``: device, dtype, head dim) and ``max_order``: how many times its output may be
differentiated (2: exact double backward, the math and Triton backends; 1: first-order only, PyTorch
SDPA and xformers, whose ``fn`` is wrapped by :func:`~fastebm.ops.attention_order.guard_first_order`
so a ``create_graph=True`` backward through it raises). Backends whose dependencies may be missing
are registered lazily with :func:`register_lazy_backend`: their loader runs the first time the
registry is consulted, and an ImportError leaves them out. This module imports no backend, so
backends can be written and tested without the registry.

Backend choice for ``backend="auto"`` (the declared order: :mod:`fastebm.ops.attention_order`):

- the environment variable ``FASTEBM_ATTENTION_BACKEND`` if set, whatever the order;
- order 1 (``first_order_attention()``): the first of :data:`FIRST_ORDER_PREFERENCE` that supports
  the tensors: ``xformers`` (CUDA, when installed), ``sdpa``, ``triton``, ``math``;
- order 2 or undeclared: Triton for CUDA tensors when available and supported, else ``math``.

Under a declared order 2 a first-order-only backend, named explicitly or forced by the variable, is
refused with a ValueError naming it and the fix.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .attention_order import check_order, current_attention_order, guard_first_order, second_order_refusal

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
ENV_VAR = "FASTEBM_ATTENTION_BACKEND"
# Fastest first: xformers dispatches to FlashAttention-3 on Hopper when its kernels are built;
# SDPA picks FlashAttention-2 / cuDNN / memory-efficient (CUDA) or its fused CPU path; our Triton
# kernels are written for the double backward; math materialises the attention matrix.
FIRST_ORDER_PREFERENCE = ("xformers", "sdpa", "triton", "math")


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    # Whether the backend can run on tensors like this one (device, dtype, head dim).
    supports: Callable[[Tensor], bool]
    # How many times the output may be differentiated: 2 (double backward) or 1 (first order only).
    max_order: int = 2


_BACKENDS: Dict[str, AttentionBackend] = {}
# name -> (loader returning (fn, supports), max_order); the loader raises ImportError when the
# backend cannot be used here.
_LAZY: Dict[str, Tuple[Callable[[], Tuple[Callable, Callable]], int]] = {}
_logged_choices: set = set()


def _check_max_order(max_order: int) -> int:
    if max_order not in (1, 2):
        raise ValueError(f"max_order must be 1 (first-order only) or 2 (exact double backward), got {max_order!r}")
    return max_order


def register_backend(name: str, fn, supports=lambda q: True, max_order: int = 2) -> None:
    """Adds (or replaces) an attention backend ``fn(q, k, v, scale) -> out``. ``max_order=1`` declares
    it first-order only: ``auto`` then uses it only under ``first_order_attention()``, and ``fn`` is
    wrapped so that a ``create_graph=True`` backward through its output raises RuntimeError."""
    _check_max_order(max_order)
    if max_order == 1:
        fn = guard_first_order(name, fn)
    _LAZY.pop(name, None)
    _BACKENDS[name] = AttentionBackend(name, fn, supports, max_order)


def register_lazy_backend(name: str, loader: Callable[[], Tuple[Callable, Callable]], max_order: int = 2) -> None:
    """Registers ``name`` on first use of the registry, from ``loader() -> (fn, supports)``; a loader
    that raises ImportError (a missing optional dependency) leaves the backend out."""
    _LAZY[name] = (loader, _check_max_order(max_order))


def _load_lazy_backends() -> None:
    for name, (loader, max_order) in list(_LAZY.items()):
        _LAZY.pop(name, None)
        try:
            fn, supports = loader()
        except ImportError as exc:  # e.g. triton missing or too old: the other backends stay
            logger.debug("attention backend %r unavailable: %s", name, exc)
            continue
        register_backend(name, fn, supports, max_order)


def available_backends(order: int = 2) -> List[str]:
    """Sorted names of the backends that can be used on this machine and differentiated ``order``
    times: ``order=2`` (default) the exact double-backward backends, ``order=1`` also the
    first-order-only ones."""
    check_order(order)
    _load_lazy_backends()
    return sorted(name for name, b in _BACKENDS.items() if b.max_order >= order)


def get_backend(name: str) -> AttentionBackend:
    _load_lazy_backends()
    return _BACKENDS[name]


def _auto(q: Tensor, order: Optional[int]) -> str:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        return forced
    if order == 1:
        for name in FIRST_ORDER_PREFERENCE:
            if name in _BACKENDS and _BACKENDS[name].supports(q) and (name != "triton" or q.is_cuda):
                return name
        return "math"
    if "triton" in _BACKENDS and q.is_cuda and _BACKENDS["triton"].supports(q):
        return "triton"
    return "math"


def resolve_backend(q: Tensor, backend: str = "auto", order: Optional[int] = None) -> str:
    """The backend name a call ``attention(q, ..., backend=backend)`` would use.

    ``order`` (1, 2 or None) is how many times the output will be differentiated; None takes the
    order declared by the enclosing ``attention_order`` / ``first_order_attention`` context (None
    outside any). Raises ValueError for an unknown name, a backend that cannot run on tensors like
    ``q``, or a first-order-only backend under order 2."""
    _load_lazy_backends()
    order = check_order(order) if order is not None else current_attention_order()
    if backend == "auto":
        backend = _auto(q, order)
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; available: {', '.join(sorted(_BACKENDS))} "
            f"(set {ENV_VAR} or pass backend= one of those)"
        )
    chosen = _BACKENDS[backend]
    if order == 2 and chosen.max_order < 2:
        raise ValueError(second_order_refusal(backend))
    if not chosen.supports(q):
        raise ValueError(
            f"attention backend {backend!r} cannot run on {q.device.type} {q.dtype} tensors with head dim "
            f"{q.shape[-1]} ({_SUPPORT_HINTS.get(backend, 'see its supports()')}); use backend='math' or "
            f"'auto' (and unset {ENV_VAR} if it is set)"
        )
    key = (backend, q.device.type, q.dtype, order)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.debug("attention backend %s for %s %s tensors (order %s)", backend, q.device.type, q.dtype, order)
    return backend


_SUPPORT_HINTS = {
    "triton": "the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU, and head dims up to 128",
    "xformers": "xformers needs CUDA tensors of float16/bfloat16/float32 and head dims up to 256",
    "sdpa": "SDPA needs floating-point tensors",
}
