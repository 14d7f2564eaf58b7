"""The registry of attention backends and the choice among them (``resolve_backend``).

A backend is ``fn(q, k, v, scale) -> out`` plus ``supports(q) -> bool`` (whether it can run on
tensors like ``q``: device, dtype, head dim). Backends whose dependencies may be missing (the
fused Triton backend) are registered lazily with :func:`register_lazy_backend`: their loader runs
the first time the registry is consulted, and an ImportError leaves them out. This module imports
no backend, so backends can be written and tested without the registry.

Backend choice for ``backend="auto"``: the environment variable ``FASTEBM_ATTENTION_BACKEND``
(``triton`` | ``math``) if set, else Triton for CUDA tensors when available and supported, else
``math``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
ENV_VAR = "FASTEBM_ATTENTION_BACKEND"


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    # Whether the backend can run on tensors like this one (device, dtype, head dim).
    supports: Callable[[Tensor], bool]


_BACKENDS: Dict[str, AttentionBackend] = {}
# name -> loader returning (fn, supports); raises ImportError when the backend cannot be used here.
_LAZY: Dict[str, Callable[[], Tuple[Callable, Callable]]] = {}
_logged_choices: set = set()


def register_backend(name: str, fn, supports=lambda q: True) -> None:
    """Adds (or replaces) an attention backend ``fn(q, k, v, scale) -> out``."""
    _LAZY.pop(name, None)
    _BACKENDS[name] = AttentionBackend(name, fn, supports)


def register_lazy_backend(name: str, loader: Callable[[], Tuple[Callable, Callable]]) -> None:
    """Registers ``name`` on first use of the registry, from ``loader() -> (fn, supports)``; a loader
    that raises ImportError (a missing optional dependency) leaves the backend out."""
    _LAZY[name] = loader


def _load_lazy_backends() -> None:
    for name, loader in list(_LAZY.items()):
        _LAZY.pop(name, None)
        try:
            fn, supports = loader()
        except ImportError as exc:  # e.g. triton missing or too old: the other backends stay
            logger.debug("attention backend %r unavailable: %s", name, exc)
            continue
        register_backend(name, fn, supports)


def available_backends():
    """Sorted names of the backends that can be used on this machine."""
    _load_lazy_backends()
    return sorted(_BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    _load_lazy_backends()
    return _BACKENDS[name]


def resolve_backend(q: Tensor, backend: str = "auto") -> str:
    """The backend name a call ``attention(q, ..., backend=backend)`` would use.

    Raises ValueError for an unknown name, or a backend that cannot run on tensors like ``q``."""
    _load_lazy_backends()
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
