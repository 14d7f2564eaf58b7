"""Frozen-backbone features for the linear probe and k-NN: one pass over the data, cached in memory.

The feature of an image is the output of block ``--layer`` (1-based; default the last) of the
timm ViT, optionally through the backbone's final LayerNorm (``--final_norm``, default on, as
timm's ``forward_features``), pooled as the class token (``--pool cls``) or the mean of the patch
tokens (``--pool avg``, MAE's choice). The tokens come from timm's ``forward_intermediates``.
Under torchrun each rank encodes its shard of the images and every rank receives all features
in dataset order.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import torch

from .. import distributed
from ..errors import UsageError
from .backbone import eval_size, resolve_backbone
from .datasets import load_eval_data, make_transforms, with_transform
from .runio import Run, ShardSampler, loader, num_workers, prepare_output_dir, start_run
from .timm_vit import build_classifier, check_img_size


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


class FrozenFeatures(NamedTuple):
    """What :func:`frozen_features` hands to the linear probe and k-NN."""

    run: Run
    bb: Any  # the Backbone
    data: Any  # the EvalData
    layer: int
    train: Tuple[torch.Tensor, torch.Tensor]  # (features (N, D) float32, labels (N,) int64), dataset order
    val: Tuple[torch.Tensor, torch.Tensor]


def frozen_features(command: str, cfg, settings: Union[str, Callable[[], str]], batch_size: int,
                    prepare: Optional[Callable[[Any], None]] = None) -> FrozenFeatures:
    """The start shared by ``fastebm-eval linprobe`` and ``knn``: the backbone (image size and
    ``--layer`` checked against it), the data, the run (process group, ``--output_dir``), a start-up
    line ending in ``settings``, then the features of the training and validation sets under the
    evaluation transform, extracted ``batch_size`` images at a time. Raises UsageError (bad flags,
    data or output folder) before any feature is computed; closes the run if anything fails, else the
    caller closes ``.run``. ``prepare(data)``, if given, runs once the data is loaded and before the
    run starts (the linear probe sizes its schedule from the number of labels); ``settings`` may be a
    callable, read after it."""
    bb = resolve_backbone(cfg)
    img_size = eval_size(cfg, bb)
    check_img_size(bb.arch, img_size)
    layer = check_layer(cfg.layer, bb.arch["depth"])
    data = load_eval_data(cfg, img_size)
    if prepare is not None:
        prepare(data)
    run = start_run(command, cfg)
    try:
        prepare_output_dir(run, cfg.output_dir)
        model = build_classifier(bb, 0, img_size=img_size, global_pool="avg", drop_path_rate=0.0,
                                 head_init_std=1.0, seed=cfg.seed).to(run.device)
        run.say(f"fastebm-eval {command}: {bb.describe()}; {data.description}; {img_size} px, layer {layer}, pool {cfg.pool}, "
                f"{settings() if callable(settings) else settings}")
        tf = make_transforms(cfg, img_size, bb.mean, bb.std, training=False)
        kw = dict(layer=layer, pool=cfg.pool, final_norm=cfg.final_norm, batch_size=batch_size,
                  workers=num_workers(cfg, data.kind))
        train = extract(run, model, with_transform(data.train, tf), **kw)
        val = extract(run, model, with_transform(data.val, tf), **kw)
    except BaseException:
        run.close()
        raise
    return FrozenFeatures(run, bb, data, layer, train, val)
