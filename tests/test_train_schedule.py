"""Learning-rate scaling, the warm-up + cosine schedule, and the weight-decay split."""
import math
import random

import pytest
import torch

import fastebm
from fastebm.train.optim import build_optimizer, split_decay
from fastebm.train.schedule import lr_at, scaled_lr


def test_lr_scales_with_effective_batch():
    blr = random.uniform(1e-4, 1e-2)
    b, a, w = random.randint(1, 64), random.randint(1, 8), random.randint(1, 4)
    assert scaled_lr(blr, b, a, w) == pytest.approx(blr * b * a * w / 256)
    # doubling any factor of the effective batch doubles the rate
    assert scaled_lr(blr, 2 * b, a, w) == pytest.approx(2 * scaled_lr(blr, b, a, w))
    assert scaled_lr(blr, b, a, 2 * w) == pytest.approx(2 * scaled_lr(blr, b, 2 * a, w) / 2)


def test_schedule_shape():
    base, low = random.uniform(1e-3, 1e-2), random.uniform(0, 1e-4)
    warm, total = random.randint(3, 11), random.randint(40, 97)
    lrs = [lr_at(s, base_lr=base, min_lr=low, warmup_steps=warm, total_steps=total) for s in range(total + 1)]
    # linear warm-up, never zero, reaching base at the end of warm-up
    for s in range(warm):
        assert lrs[s] == pytest.approx(base * (s + 1) / warm)
    assert lrs[0] > 0
    assert lrs[warm] == pytest.approx(base)
    # then monotone non-increasing half cosine to min_lr
    tail = lrs[warm:]
    assert all(x >= y - 1e-15 for x, y in zip(tail, tail[1:]))
    assert lrs[total] == pytest.approx(low)
    mid = warm + (total - warm) / 2
    if float(mid).is_integer():
        assert lrs[int(mid)] == pytest.approx((base + low) / 2)
    # independent formula at a random point of the cosine part
    s = random.randint(warm, total)
    expect = low + (base - low) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    assert lrs[s] == pytest.approx(expect)


def test_schedule_without_warmup_starts_at_base():
    assert lr_at(0, base_lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(1e-3)


def test_weight_decay_exemptions():
    model = fastebm.create_model("vit_demo", img_size=16, depth=1)
    objective = fastebm.RestorationObjective(model, steps=2)
    decay, no_decay, names = split_decay(objective.named_parameters())
    assert "alpha_logits" in names
    assert "model.pos_embed" in names and "model.cls_token" in names
    assert any(n.endswith("norm1.weight") for n in names) and any(n.endswith("qkv.bias") for n in names)
    assert all(p.ndim >= 2 for p in decay)
    assert len(decay) + len(no_decay) == len([p for p in objective.parameters() if p.requires_grad])
    wd = random.uniform(0.01, 0.1)
    opt = build_optimizer(objective, lr=1e-3, weight_decay=wd, device=torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.pos_embed) not in decayed
