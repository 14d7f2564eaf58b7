"""Drop-in ops: attention with backend dispatch (PyTorch reference | Triton with a double backward |
first-order SDPA / xformers under :func:`first_order_attention`), its custom ops for the compiled
explicit engine, and the hand-written layer VJPs (:mod:`fastebm.ops.vjp`)."""
from .attention import (
    attention,
    attention_order,
    available_backends,
    first_order_attention,
    math_attention,
    register_backend,
    resolve_backend,
)

__all__ = [
    "attention", "attention_order", "available_backends", "first_order_attention", "math_attention",
    "register_backend", "resolve_backend",
]
