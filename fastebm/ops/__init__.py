"""Drop-in ops: attention with backend dispatch (Triton | PyTorch reference) and a double
backward, its custom ops for the compiled explicit engine, and the hand-written layer VJPs
(:mod:`fastebm.ops.vjp`)."""
from .attention import attention, available_backends, math_attention, register_backend, resolve_backend

__all__ = ["attention", "available_backends", "math_attention", "register_backend", "resolve_backend"]
