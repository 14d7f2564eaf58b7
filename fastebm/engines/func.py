"""The ``func`` engine: ``dE/dx`` by ``torch.func.grad``, traced into the compiled forward graph.

Correct only with attention made of plain PyTorch ops (the math backend): an
``autograd.Function`` (the fused Triton attention of the eager engine) under ``torch.func.grad``
inside ``torch.compile`` gives *silently wrong* second-order gradients, and custom ops are rejected
by functorch transforms (docs/design.md §4). :func:`check_func_attention` refuses those set-ups.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..ops.attention import resolve_backend

Tensor = torch.Tensor

REFUSAL = (
    "engine='func' cannot use the fused {backend!r} attention: torch.func.grad through its "
    "autograd.Function under torch.compile gives silently wrong second-order gradients. Use "
    "engine='explicit' (fused attention through custom ops) or build the model with "
    "attn_backend='math' (and unset FASTEBM_ATTENTION_BACKEND if it is set)."
)


def check_func_attention(model, x: Tensor) -> None:
    """Raises ValueError unless every attention of ``model`` resolves to the math backend for ``x``."""
    seen = set()
    for mod in model.modules():
        backend = getattr(mod, "backend", None)
        head_dim = getattr(mod, "head_dim", None)
        if backend is None or head_dim is None:
            continue
        if backend == "triton":
            raise ValueError(REFUSAL.format(backend=backend))
        key = (backend, head_dim)
        if key in seen:
            continue
        seen.add(key)
        resolved = resolve_backend(x.new_empty((1, 1, 1, head_dim)), backend)
        if resolved != "math":
            raise ValueError(REFUSAL.format(backend=resolved))


def func_energy_and_grad(model, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(E(x), dE/dx)`` with ``torch.func.grad``; the gradient stays differentiable with respect
    to the model's parameters and to ``x``'s own history (functorch lifts the captured tensors)."""

    def total_energy(z: Tensor):
        energy = model(z)
        return energy.sum(), energy.detach()

    grad, energy = torch.func.grad(total_energy, has_aux=True)(x)
    return energy, grad
