"""The torch op schemas ``fastebm::fused_corrupt`` and ``fastebm::philox_words`` and their fake
(meta) implementations.

Registered here in Python so that the ops exist - and trace under ``torch.compile`` / fake tensors -
on every machine. Their CUDA implementations come from ``csrc/corrupt_op.cpp``
(``TORCH_LIBRARY_IMPL(fastebm, CUDA, ...)``), loaded by :mod:`fastebm.corrupt._build`.
"""
from __future__ import annotations

import torch

OP_NAME = "fastebm::fused_corrupt"
_SCHEMA = (
    "fused_corrupt(Tensor images, Tensor task_ids, Tensor patch_src, Tensor sample_ids, Tensor mean, "
    "Tensor std, Tensor noise_scale, int key0, int key1, int offset, int patch_size, int sr_factor) "
    "-> (Tensor, Tensor, Tensor)"
)

_lib = torch.library.Library("fastebm", "FRAGMENT")  # the attention custom ops share the namespace
_lib.define(_SCHEMA)
_lib.define("philox_words(Tensor sample_ids, int n, int key0, int key1, int offset, int purpose) -> Tensor")


@torch.library.register_fake(OP_NAME)
def _fused_corrupt_fake(images, task_ids, patch_src, sample_ids, mean, std, noise_scale, key0, key1, offset,
                        patch_size, sr_factor):
    b, c, h, w = images.shape
    clean = images.new_empty((b, c, h, w), dtype=torch.float32)
    return clean, torch.empty_like(clean), images.new_empty((b, 1, h, w), dtype=torch.float32)


@torch.library.register_fake("fastebm::philox_words")
def _philox_words_fake(sample_ids, n, key0, key1, offset, purpose):
    return sample_ids.new_empty((sample_ids.shape[0], n), dtype=torch.int64)
