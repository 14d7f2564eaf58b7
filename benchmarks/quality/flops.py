"""Training FLOPs per optimiser step, fastebm's restoration objective and the MAE baseline alike.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (its formula per aten op: matmuls,
convolutions, attention), for the forward and the backward of one batch's loss. For fastebm that
includes each restoration step's ``autograd.grad(create_graph=True)`` and the double backward
through them, so T = 2 costs several forwards. The optimiser's element-wise update is not a
counted op (negligible next to the matmuls).

FlopCounterMode attributes FLOPs to modules with a ``ModuleTracker`` whose backward hooks make
``torch.autograd.grad`` fail ("A leaf node was passed to _will_engine_execute_node ..."), so here
its tracker is replaced by one that puts every FLOP in the global total; the counting itself is
FlopCounterMode's.

    python benchmarks/quality/flops.py [fastebm-train flags]      # prints GFLOP per step
"""
from __future__ import annotations

import sys
from typing import List, Sequence

import torch


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: no hooks, one parent ("Global")."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def count(fn) -> int:
    """FLOPs of ``fn()`` (forward and backward ops it runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def sample_images(batch_size: int, img_size: int = 32, seed: int = 0) -> torch.Tensor:
    from fastebm.data.builtin import BuiltinDemoData

    data = BuiltinDemoData(img_size, seed)
    return torch.stack([data.load(i * 37 % len(data), 0)[0] for i in range(batch_size)])


def fastebm_step_flops(train_flags: Sequence[str]) -> int:
    """FLOPs of one fastebm-train step (restoration forward + loss backward) with these flags."""
    from fastebm.corrupt import prepare_batch
    from fastebm.train.build import build_objective
    from fastebm.train.config import parse_config

    cfg = parse_config(list(train_flags) + ["--output_dir", "unused"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        obj = build_objective(cfg)
    images = sample_images(cfg.batch_size, obj.model.img_size[0])
    clean, corrupted, weight, _ = prepare_batch(images, cfg.tasks, seed=0, patch_size=obj.model.patch_size,
                                                params=cfg.task_params)

    def step():
        loss, _ = obj(clean, corrupted, weight)
        loss.backward()

    return count(step)


def mae_step_flops(batch_size: int = 32, img_size: int = 32) -> int:
    """FLOPs of one MAE-baseline step at ``img_size`` px (mae.py: encoder on visible patches, decoder, loss backward)."""
    import mae

    with torch.random.fork_rng(devices=[]):
        model = mae.build(0, img_size=img_size)
        x = mae.normalise(sample_images(batch_size, img_size))

        def step():
            loss, _, _ = model(x)
            loss.backward()

        return count(step)


def main(argv: List[str] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    print(f"fastebm {' '.join(argv) or '(defaults)'}: {fastebm_step_flops(argv) / 1e9:.2f} GFLOP/step")
    print(f"mae: {mae_step_flops() / 1e9:.2f} GFLOP/step")


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    main()
