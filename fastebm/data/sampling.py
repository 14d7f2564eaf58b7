"""Deterministic data order and per-sample random draws.

Everything random about the data is a pure function of (seed, epoch, sample index): the epoch's
order is a permutation drawn from a generator seeded with (seed, epoch), and each sample's
augmentation uses a generator seeded with (seed, epoch, dataset index). No global RNG is touched
(``seeded_global_rngs`` is for library code that reads them, such as timm's transforms in fastebm-eval).
Consequences: a resumed run sees exactly the batches it would have seen, and N processes with
batch B see the same samples with the same crops as one process with batch N*B (each rank takes
its slice of the same global batch).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (order matters); stable across runs and machines."""
    h = 0x2545F4914F6CDD1D
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


def generator_for(*values: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix_seed(*values))
    return g


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU global RNGs seeded from ``seed`` (a 63-bit int, e.g. from
    :func:`mix_seed`) inside the block and restored to their previous states after it: for library code
    that draws from the global RNGs (timm's transforms), one image at a time, without disturbing the caller's
    streams. CUDA RNGs are not touched."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.random.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed: CUDA too)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# Stream tags keep the order and the augmentation draws independent of each other.
ORDER_STREAM = 1
AUGMENT_STREAM = 2
SUBSTITUTE_STREAM = 4  # (3 is the loader's worker seed)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _coprime_stride(n: int, r: int) -> int:
    """A stride in [1, n) near ``r`` (taken mod n) with gcd(stride, n) = 1, so k*stride mod n visits every index."""
    if n <= 2:
        return 1
    s = 1 + r % (n - 1)
    while math.gcd(s, n) != 1:
        s = s + 1 if s + 1 < n else 1
    return s


def _affine_walk(n: int, start: int, stride: int) -> Iterator[int]:
    for k in range(n):
        yield (start + k * stride) % n


def substitute_order(num_samples: int, seed: int, epoch: int, index: int) -> Iterator[int]:
    """Every dataset index except ``index``, once each: the candidates that replace an unreadable sample.

    A full-period affine walk (start + k * stride) mod n whose start and stride (coprime with n)
    are drawn from (seed, epoch, index), so the first readable candidate is a pure function of
    those and of which files are readable (not of worker count, cache state or timing), and a
    run of bad files next to each other in the sorted list is left after a step or two.
    """
    h = mix_seed(seed, SUBSTITUTE_STREAM, epoch, index)
    start, stride = h % num_samples, _coprime_stride(num_samples, h >> 24)
    return (c for c in _affine_walk(num_samples, start, stride) if c != index)


def resolve_sample(num_samples: int, seed: int, epoch: int, index: int,
                   readable: Callable[[int], bool]) -> Tuple[Optional[int], List[int]]:
    """The dataset index that sample ``index`` of ``epoch`` is loaded from, and the unreadable indices met first.

    The one definition of the substitution rule, shared by the torch loader (``loader.KeyedSamples``,
    whose ``readable`` decodes as the walk goes) and the DALI loader (``dali.DaliMicroBatchStream``,
    whose ``readable`` looks the file up in its pre-built index): ``index`` itself if it is
    readable, else the first readable candidate along :func:`substitute_order` (seed, epoch,
    index). ``readable`` is called in that order, once per candidate, and not after the first
    ``True``. Returns ``(chosen, bad)``: ``chosen`` is None when no file of the data set is
    readable; ``bad`` lists every index that ``readable`` rejected, in walk order (what the loaders
    report with the sample). The substitute's crop and flip are drawn for ``index``, not ``chosen``
    (``ImageFolderData.load(aug_index=)``), so samples sharing a substitute still differ.
    """
    bad: List[int] = []
    for candidate in itertools.chain((index,), substitute_order(num_samples, seed, epoch, index)):
        if readable(candidate):
            return candidate, bad
        bad.append(candidate)
    return None, bad


def spread_order(num_samples: int) -> Iterator[int]:
    """Every index once, consecutive ones far apart (golden-ratio stride): probes a list evenly from the start.

    Used to find a readable file quickly even when long runs of the sorted list are damaged.
    """
    return _affine_walk(num_samples, 0, _coprime_stride(num_samples, round(num_samples * _GOLDEN) - 1))


@functools.lru_cache(maxsize=2)  # one epoch in use, one about to start; callers must not mutate
def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The dataset indices of an epoch, in the order every process agrees on."""
    return torch.randperm(num_samples, generator=generator_for(seed, ORDER_STREAM, epoch))


class SampleKey(NamedTuple):
    """What a dataset needs to produce one sample deterministically."""

    epoch: int
    index: int  # dataset index
    position: int  # position in the epoch order (a global id, independent of the process count)


@dataclass(frozen=True)
class BatchPlan:
    """How optimiser steps map to samples.

    One optimiser step consumes ``accum_iter`` global micro-batches of ``batch_size * world_size``
    samples; rank r loads the slice [r*batch_size, (r+1)*batch_size) of each. Leftover samples
    at the end of an epoch (fewer than one optimiser step) are dropped, like ``drop_last``.
    """

    num_samples: int
    batch_size: int
    accum_iter: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    @property
    def global_micro_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.global_micro_batch * self.accum_iter)

    def epoch_parts(self, start_step: int,
                    end_step: Optional[int] = None) -> Iterator[Tuple[int, List[Tuple[int, int]]]]:
        """Steps [start_step, end_step) (``None``: without end) cut at epoch boundaries: per part, its
        epoch and its ``(step, micro)`` schedule in order. The loaders start one reader per part, so a
        run resumed mid-epoch reads only the rest of that epoch."""
        spe = self.steps_per_epoch
        step = start_step
        while end_step is None or step < end_step:
            epoch = step // spe
            stop = (epoch + 1) * spe if end_step is None else min((epoch + 1) * spe, end_step)
            yield epoch, [(s, m) for s in range(step, stop) for m in range(self.accum_iter)]
            step = stop

    def micro_batch_keys(self, step: int, micro: int) -> List[SampleKey]:
        """Keys of this rank's samples for micro-step ``micro`` of optimiser step ``step`` (global)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.num_samples, self.seed, epoch)
        start = (step_in_epoch * self.accum_iter + micro) * self.global_micro_batch + self.rank * self.batch_size
        return [SampleKey(epoch, int(order[p]), p) for p in range(start, start + self.batch_size)]
