"""Turns a BatchPlan into micro-batches of uint8 images, skipping (and counting) unreadable files."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .folder import UnreadableImage
from .sampling import BatchPlan, SampleKey, generator_for

LOADER_STREAM = 3  # seeds DataLoader's own draws (worker base seed), never the global RNG

# How many following dataset indices to try before giving up on a sample whose file is bad.
MAX_SUBSTITUTE_TRIES = 64


class KeyedSamples(Dataset):
    """Map-style dataset indexed by SampleKey (epoch matters for augmentation).

    An unreadable file is replaced by the next readable index (deterministically), and the bad
    path travels with the batch so the main process can count it (and stop under --strict_data).
    """

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey):
        bad: List[str] = []
        n = len(self.source)
        for k in range(min(n, MAX_SUBSTITUTE_TRIES)):
            index = (key.index + k) % n
            try:
                image, label = self.source.load(index, key.epoch)
                return {"image": image, "label": label, "position": key.position, "bad": bad}
            except UnreadableImage as exc:
                bad.append(f"{exc.path} ({exc.reason})")
        raise RuntimeError(f"{MAX_SUBSTITUTE_TRIES} consecutive unreadable images starting at {self.source.describe(key.index)}: "
                           + "; ".join(bad[:3]))


def collate(items: Sequence[Dict]) -> Dict:
    return {
        "images": torch.stack([it["image"] for it in items]),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "positions": torch.tensor([it["position"] for it in items], dtype=torch.long),
        "bad": [b for it in items for b in it["bad"]],
    }


class MicroBatchStream:
    """Yields this rank's micro-batches from optimiser step ``start_step`` on, epoch after epoch.

    Batch composition comes from ``plan`` (pure function of seed/epoch/step); workers only load.
    Each epoch gets its own DataLoader over the remaining micro-batches, so resuming mid-epoch
    does not load the skipped part.
    """

    def __init__(self, source, plan: BatchPlan, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = KeyedSamples(source)
        self.plan = plan
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def iterate(self, start_step: int, end_step: Optional[int] = None) -> Iterator[Dict]:
        """Micro-batches of steps [start_step, end_step); each carries 'step' and 'micro'."""
        spe = self.plan.steps_per_epoch
        step = start_step
        while end_step is None or step < end_step:
            epoch_end = (step // spe + 1) * spe
            stop = epoch_end if end_step is None else min(epoch_end, end_step)
            schedule = [(s, m) for s in range(step, stop) for m in range(self.plan.accum_iter)]
            batches = [self.plan.micro_batch_keys(s, m) for s, m in schedule]
            # An explicit generator: creating a DataLoader iterator otherwise draws a worker base seed
            # from the global torch RNG, which would make a resumed run's RNG stream differ.
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                collate_fn=collate, pin_memory=self.pin_memory,
                                prefetch_factor=4 if self.num_workers > 0 else None,
                                generator=generator_for(self.plan.seed, LOADER_STREAM, step // spe))
            for (s, m), batch in zip(schedule, loader):
                batch["step"], batch["micro"] = s, m
                yield batch
            step = stop
