"""Triton kernels of fastebm, installed as ``fastebm.kernels`` (never as a top-level ``kernels``).

Each op keeps its kernel, host wrapper and PyTorch reference side by side:

- ``fastebm.kernels.attention``: fused attention forward, backward and double backward (Triton
  kernels and their host wrappers; imports triton).
- ``fastebm.kernels.attention_ref``: the PyTorch reference of each stage, the kernels'
  specification (imports no triton).
- ``fastebm.kernels.attention_common``: what kernels, references and ``fastebm.ops`` share:
  accumulation dtype, q/k/v shape checks, supported dtypes and head dims (imports no triton).
- ``python -m fastebm.kernels.compile_check``: compiles the kernels for a GPU target without a GPU.

This package imports nothing from the rest of fastebm, and this file imports nothing at all, so that
``import fastebm`` works on machines without triton.
"""
