"""Frozen-backbone features for the linear probe and k-NN: one pass over the data, cached in memory.

The feature of an image is the output of block ``--layer`` (1-based; default the last) of the
timm ViT, optionally through the backbone's final LayerNorm (``--final_norm``, default on, as
timm's ``forward_features``), pooled as the class token (``--pool cls``) or the mean of the patch
tokens (``--pool avg``, MAE's choice). The tokens come from timm's ``forward_intermediates``.
Under torchrun each rank encodes its shard of the images and every rank receives all features
in dataset order.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import distributed
from ..errors import UsageError
from .runio import Run, ShardSampler, loader


def check_layer(layer, depth: int) -> int:
    """The 1-based block index to read (``None`` = the last); UsageError outside 1..depth."""
    if layer is None:
        return depth
    if not 1 <= layer <= depth:
        raise UsageError(f"--layer {layer} is outside the model: it has {depth} blocks; use 1..{depth} (or omit it for the last)")
    return int(layer)


def pooled_tokens(model, x: torch.Tensor, layer: int, pool: str, final_norm: bool) -> torch.Tensor:
    """(B, D) feature of block ``layer`` (1-based) for a normalised batch ``x`` (B, 3, S, S)."""
    out = model.forward_intermediates(x, indices=[layer - 1], return_prefix_tokens=True, norm=final_norm,
                                      output_fmt="NLC", intermediates_only=True)
    patches, prefix = out[0]
    return prefix[:, 0] if pool == "cls" else patches.mean(1)


@torch.no_grad()
def extract(run: Run, model, dataset, *, layer: int, pool: str, final_norm: bool, batch_size: int,
            workers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D), labels int64 (N,)) of the whole dataset, on the CPU, in dataset order."""
    model.eval()
    n = len(dataset)
    sampler = ShardSampler(n, run.rank, run.world)
    feats, labels = [], []
    for x, y in loader(dataset, batch_size, sampler, workers, run.device):
        with run.autocast_ctx():
            f = pooled_tokens(model, x.to(run.device, non_blocking=True), layer, pool, final_norm)
        feats.append(f.float().cpu())
        labels.append(y)
    dim = model.embed_dim
    f_local = torch.cat(feats) if feats else torch.empty(0, dim)
    y_local = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    if run.world == 1:
        return f_local, y_local
    parts = distributed.all_gather_object((sampler.indices, f_local, y_local))
    f_all, y_all = torch.empty(n, dim), torch.empty(n, dtype=torch.long)
    for idx, f, y in parts:
        f_all[idx], y_all[idx] = f, y
    return f_all, y_all
