"""How many times attention will be differentiated: the order that the backend choice must serve.

Restoration (``RestorationObjective.restore``), evaluation and feature extraction, the no-graph
steps of ``grad_mode="truncated"`` and fine-tuning differentiate attention at most once; the
restoration objective's graph-keeping steps (every ``exact`` step, the last ``truncated`` step, so
training) differentiate it twice. A first-order-only backend (PyTorch SDPA, xformers) is correct
and fastest in the first group and wrong in the second (its backward has no derivative).

The order is declared with a context manager, read by ``resolve_backend`` when a call is made:

- :func:`first_order_attention` (``attention_order(1)``): ``backend="auto"`` picks the fastest
  first-order kernel that supports the tensors;
- ``attention_order(2)``: ``auto`` picks a second-order backend (Triton on CUDA, else math), and an
  explicitly named first-order-only backend is refused with a ValueError before anything runs;
- outside both (order ``None``): today's behaviour, ``auto`` picks a second-order backend; an
  explicitly named first-order backend runs, guarded by :func:`guard_first_order`.

Whatever the declared order, a first-order-only backend's output refuses a ``create_graph=True``
backward (:func:`guard_first_order`), so a wrong choice fails loudly, never with a silently wrong
second derivative. The order lives in a ``contextvars.ContextVar`` (per thread and per asyncio
task; ``torch.compile`` traces reading it). Autograd runs CUDA backward passes on its own worker
threads, where the variable is unset: :func:`checkpoint_context_fn` carries the order into the
recomputation of ``torch.utils.checkpoint`` so recomputed attention uses the forward's backend.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "attention_order", "first_order_attention", "current_attention_order", "checkpoint_context_fn",
    "guard_first_order", "second_order_refusal",
]

ORDERS = (1, 2)
_ORDER: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("fastebm_attention_order", default=None)


def current_attention_order() -> Optional[int]:
    """The order declared by the innermost :func:`attention_order` context: 1, 2, or None (none)."""
    return _ORDER.get()


def check_order(order: Optional[int]) -> Optional[int]:
    if order is not None and order not in ORDERS:
        raise ValueError(f"attention order must be 1 (first derivatives only) or 2 (double backward), got {order!r}")
    return order


@contextlib.contextmanager
def attention_order(order: Optional[int]) -> Iterator[None]:
    """Declares that attention called inside is differentiated at most ``order`` times (1 or 2;
    ``None`` restores the undeclared default). Nests: the innermost declaration wins. Raises
    ValueError for another value."""
    token = _ORDER.set(check_order(order))
    try:
        yield
    finally:
        _ORDER.reset(token)


def first_order_attention():
    """``attention_order(1)``: inside, ``backend="auto"`` picks the fastest first-order attention
    kernel available (xformers on CUDA when installed, PyTorch SDPA, ...; see
    ``fastebm.ops.attention``). For restoration, evaluation, feature extraction and fine-tuning:
    anything that needs no double backward through attention.

    Example::

        with fastebm.ops.first_order_attention():
            feats = model.forward_features(x)
    """
    return attention_order(1)


def checkpoint_context_fn() -> Tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: the forward
    runs as is, the recomputation under the order declared now (the backward, where recomputation
    happens, may run on an autograd worker thread where no order is declared)."""
    return contextlib.nullcontext(), attention_order(current_attention_order())


def second_order_refusal(name: str) -> str:
    """The message of every refusal of the first-order-only backend ``name`` in a second-order path."""
    return (
        f"attention backend {name!r} is first-order only (its backward has no derivative), but this attention is differentiated "
        f"twice (a create_graph=True backward: the restoration objective's exact steps and last truncated "
        f"step, i.e. training). Use backend/attn_backend 'auto', 'triton' or 'math' for such paths (and "
        f"unset FASTEBM_ATTENTION_BACKEND if it names {name!r}); first-order kernels such as {name!r} are "
        f"picked automatically by 'auto' inside fastebm.ops.first_order_attention() (restore, evaluation, "
        f"fine-tuning)."
    )


def guard_first_order(name: str, fn: Callable[[Tensor, Tensor, Tensor, float], Tensor]):
    """``fn`` (a backend ``fn(q, k, v, scale) -> out`` whose backward is not differentiable) wrapped
    so that a backward through its output with ``create_graph=True`` raises RuntimeError naming
    ``name`` and the fix, before ``fn``'s own backward runs.

    The equivalent of ``torch.autograd.function.once_differentiable``, done with a gradient hook on
    the output rather than a second autograd node: the backend's native autograd node (and what it
    saves) stays as it is. Autograd runs hooks in the backward's grad mode, which is on exactly
    when the backward builds a graph (``create_graph=True``), i.e. when the gradient will be
    differentiated again."""
    message = second_order_refusal(name)

    def refuse_create_graph(grad: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(message)
        return grad

    def guarded(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out = fn(q, k, v, scale)
        if out.requires_grad:
            out.register_hook(refuse_create_graph)
        return out

    guarded.__wrapped__ = fn
    guarded.__name__ = getattr(fn, "__name__", name)
    guarded.__doc__ = fn.__doc__
    return guarded
