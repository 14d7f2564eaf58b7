"""Triton kernels of fastebm, installed as ``fastebm.kernels`` (never as a top-level ``kernels``).

Each op keeps its kernel, host wrapper and PyTorch reference side by side:

- ``fastebm.kernels.attention``: fused attention forward, backward and double backward (host
  wrappers; imports triton). The Triton kernels are in ``attention_fwd_bwd_kernels`` and
  ``attention_dbwd_kernels``, their shared device helpers and conventions in ``attention_tiles``.
- ``fastebm.kernels.attention_config``: the block-size policy and the launch table
  ``attention_configs.json`` (imports no triton); ``python -m fastebm.kernels.tune`` regenerates
  the table on a GPU.
- ``fastebm.kernels.attention_ref``: the PyTorch reference of each stage, the kernels'
  specification (imports no triton).
- ``fastebm.kernels.attention_common``: what kernels, references and ``fastebm.ops`` share:
  accumulation dtype, q/k/v shape checks, supported dtypes and head dims (imports no triton).
- ``python -m fastebm.kernels.compile_check``: compiles the kernels for a GPU target without a GPU.

This package imports nothing from the rest of fastebm, and this file imports nothing at all, so that
``import fastebm`` works on machines without triton.
"""
