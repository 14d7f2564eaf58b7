"""Turns a BatchPlan into micro-batches of uint8 images, replacing (and reporting) unreadable files."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Set

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError, UnreadableImage
from .sampling import BatchPlan, SampleKey, generator_for, substitute_order

LOADER_STREAM = 3  # seeds DataLoader's own draws (worker base seed), never the global RNG


class KeyedSamples(Dataset):
    """Map-style dataset indexed by SampleKey (epoch matters for augmentation).

    An unreadable file is replaced by the first readable file along
    :func:`fastebm.data.sampling.substitute_order` (seed, epoch, index): a walk over the whole
    dataset, so the substitute is a pure function of (seed, epoch, index) and of which files are
    readable, whatever the worker count, and it exists as long as one file in the dataset decodes.
    The substitute's crop is drawn for the requested index (``source.load(..., aug_index=)``).
    Every bad file met travels with the batch in ``"bad"`` ("path (reason)") so the main process
    can count and list it (and stop under --strict_data). If the walk finds nothing readable
    (files deleted or damaged after start-up) the item carries ``"fatal"`` and
    :class:`MicroBatchStream` raises a one-line DataError in the main process (an exception raised
    in a worker would arrive wrapped in a multi-line traceback).
    """

    def __init__(self, source, seed: int = 0):
        self.source = source
        self.seed = seed
        # Indices this process has already seen fail: skipped without decoding again. Only a speed-up:
        # the walk's answer does not depend on it, and each bad file is still reported once per process.
        self._known_bad: Set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey):
        bad: List[str] = []
        item = self._try(key.index, key, bad, aug_index=None)
        if item is None:
            for index in substitute_order(len(self.source), self.seed, key.epoch, key.index):
                item = self._try(index, key, bad, aug_index=key.index)
                if item is not None:
                    break
        if item is None:
            return {"fatal": f"no readable image left in the data set ({len(self.source)} files; "
                             f"e.g. {bad[0] if bad else self.source.describe(key.index)}): files changed during the run?",
                    "bad": bad}
        image, label = item
        return {"image": image, "label": label, "position": key.position, "bad": bad}

    def _try(self, index: int, key: SampleKey, bad: List[str], aug_index: Optional[int]):
        if index in self._known_bad:
            return None
        try:
            if aug_index is None:
                return self.source.load(index, key.epoch)
            return self.source.load(index, key.epoch, aug_index=aug_index)
        except UnreadableImage as exc:
            self._known_bad.add(index)
            bad.append(f"{exc.path} ({exc.reason})")
            return None


def collate(items: Sequence[Dict]) -> Dict:
    fatal = [it["fatal"] for it in items if "fatal" in it]
    if fatal:
        return {"fatal": fatal[0], "bad": [b for it in items for b in it["bad"]]}
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
        self.dataset = KeyedSamples(source, seed=plan.seed)
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
                if "fatal" in batch:
                    raise DataError(f"--data: {batch['fatal']}")
                batch["step"], batch["micro"] = s, m
                yield batch
            step = stop
