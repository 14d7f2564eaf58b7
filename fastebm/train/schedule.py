"""Learning-rate scaling and the per-iteration cosine schedule with linear warm-up."""
from __future__ import annotations

import math


def scaled_lr(blr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """MAE's linear scaling rule: lr = blr * effective batch / 256, effective = batch * accum * world."""
    return blr * batch_size * accum_iter * world_size / 256.0


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Linear warm-up from ~0 to ``base_lr`` over ``warmup_steps`` (step 0 already gets a non-zero
    rate, so no step is wasted), then half a cosine down to ``min_lr`` at ``total_steps``. The
    schedule is fixed by ``--epochs``; stopping early (``--max_steps``) just stops walking along it.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return min_lr if step >= total_steps else base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
