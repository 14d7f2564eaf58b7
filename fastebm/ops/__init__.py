"""Drop-in ops with backend dispatch (Triton | CUDA | PyTorch reference)."""
from .attention import attention, available_backends, math_attention, register_backend, resolve_backend

__all__ = ["attention", "available_backends", "math_attention", "register_backend", "resolve_backend"]
