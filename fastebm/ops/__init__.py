"""Drop-in ops with backend dispatch (Triton | PyTorch reference): attention with a double backward,
and its custom ops for the compiled explicit engine."""
from .attention import attention, available_backends, math_attention, register_backend, resolve_backend

__all__ = ["attention", "available_backends", "math_attention", "register_backend", "resolve_backend"]
