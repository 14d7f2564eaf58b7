"""The ``explicit`` engine: ``dE/dx`` from the model's hand-written backward (forward ops only).

The model provides ``energy_and_input_grad(x, attn_backend)`` (EnergyViT composes its layers'
``forward_with_cache`` / ``input_grad``, see ``fastebm.models.layers``); attention runs through the
``fastebm::attn_*`` custom ops whose registered autograd chains fwd -> bwd -> double bwd, so the
fused Triton kernels take part in the compiled step.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..ops.attention_custom_ops import resolve_op_backend

Tensor = torch.Tensor


def check_explicit_model(model) -> None:
    if not callable(getattr(model, "energy_and_input_grad", None)):
        raise ValueError(
            f"engine='explicit' needs a model with a hand-written input gradient "
            f"(energy_and_input_grad), such as fastebm.EnergyViT; {type(model).__name__} has none. "
            "Use engine='eager' or engine='func' for other models."
        )


def explicit_op_backend(model, x: Tensor) -> str:
    """The custom ops' kernel family for ``model``'s attention on tensors like ``x``."""
    # Only the device and dtype of the probe matter to the backend choice (and the head dim to
    # whether the Triton kernels support it).
    head_dim = model.blocks[0].attn.head_dim if hasattr(model, "blocks") else x.shape[-1]
    return resolve_op_backend(x.new_empty((1, 1, 1, head_dim)), getattr(model, "attn_backend", "auto"))


def explicit_energy_and_grad(model, x: Tensor, op_backend: str) -> Tuple[Tensor, Tensor]:
    return model.energy_and_input_grad(x, op_backend)
