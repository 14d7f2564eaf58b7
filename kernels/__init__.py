"""Triton kernels of fastebm, installed as ``fastebm.kernels`` (never as a top-level ``kernels``).

- ``fastebm.kernels.attention``: fused attention forward, backward and double backward.
- ``python -m fastebm.kernels.compile_check``: compiles them for a GPU target without a GPU.

Submodules import triton; this package itself imports nothing so that ``import fastebm`` works
on machines without triton.
"""
