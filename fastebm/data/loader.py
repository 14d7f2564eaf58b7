"""Turns a BatchPlan into micro-batches of uint8 images, replacing (and reporting) unreadable files."""
from __future__ import annotations

import signal
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError, UnreadableImage, unreadable_entry
from .sampling import BatchPlan, SampleKey, generator_for, resolve_sample

LOADER_STREAM = 3  # seeds DataLoader's own draws (worker base seed), never the global RNG


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM and SIGINT.

    Schedulers, container runtimes and torchrun signal every process of a job (its process group),
    so the workers get the main process's SIGTERM too; dying of it made the main process fail with
    "DataLoader worker (pid ...) is killed by signal: Terminated" before it could save. The main
    process owns shutdown: it stops at the next step boundary, saves, and then ends the workers
    (DataLoader's shutdown asks them to exit; they also exit by themselves once the main process is gone).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def no_readable_left(num_files: int, example: str) -> str:
    """The one-line reason both loaders stop with when no file of the data set decodes (any more)."""
    return (f"no readable image left in the data set ({num_files} files; e.g. {example}): "
            "files changed during the run?")


class KeyedSamples(Dataset):
    """Map-style dataset indexed by SampleKey (epoch matters for augmentation).

    An unreadable file is replaced as :func:`fastebm.data.sampling.resolve_sample` defines (the
    first readable file along ``substitute_order(n, seed, epoch, index)``, a walk over the whole
    dataset), decoding candidates as the walk goes: the substitute is a pure function of (seed,
    epoch, index) and of which files are readable, whatever the worker count, and it exists as long
    as one file in the dataset decodes. The substitute's crop is drawn for the requested index
    (``source.load(..., aug_index=)``). Every bad file the walk passes travels with the sample in
    ``"bad"`` ("path (reason)", in walk order; the train loop de-duplicates) so the main process
    can count and list it (and stop under --strict_data). If the walk finds nothing readable
    (files deleted or damaged after start-up) the item carries ``"fatal"`` and
    :class:`MicroBatchStream` raises a one-line DataError in the main process (an exception raised
    in a worker would arrive wrapped in a multi-line traceback).
    """

    def __init__(self, source, seed: int = 0):
        self.source = source
        self.seed = seed
        # Files this process has already seen fail, with their report: skipped without decoding again.
        # Only a speed-up: neither the substitute nor the report depends on it.
        self._known_bad: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey):
        loaded = []

        def readable(index: int) -> bool:
            if index in self._known_bad:
                return False
            try:  # only a substitute passes aug_index: data without bad files need not accept it
                extra = {} if index == key.index else {"aug_index": key.index}
                loaded.append(self.source.load(index, key.epoch, **extra))
                return True
            except UnreadableImage as exc:
                self._known_bad[index] = unreadable_entry(exc.path, exc.reason)
                return False

        chosen, bad_indices = resolve_sample(len(self.source), self.seed, key.epoch, key.index, readable)
        bad = [self._known_bad[i] for i in bad_indices]
        if chosen is None:
            return {"fatal": no_readable_left(len(self.source), bad[0] if bad else self.source.describe(key.index)),
                    "bad": bad}
        image, label = loaded[0]
        return {"image": image, "label": label, "position": key.position, "bad": bad}


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
        for epoch, schedule in self.plan.epoch_parts(start_step, end_step):
            batches = [self.plan.micro_batch_keys(s, m) for s, m in schedule]
            # An explicit generator: creating a DataLoader iterator otherwise draws a worker base seed
            # from the global torch RNG, which would make a resumed run's RNG stream differ.
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                collate_fn=collate, pin_memory=self.pin_memory,
                                worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
                                prefetch_factor=4 if self.num_workers > 0 else None,
                                generator=generator_for(self.plan.seed, LOADER_STREAM, epoch))
            for (s, m), batch in zip(schedule, loader):
                if "fatal" in batch:
                    raise DataError(f"--data: {batch['fatal']}")
                batch["step"], batch["micro"] = s, m
                yield batch
