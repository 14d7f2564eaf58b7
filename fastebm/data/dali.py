"""``--loader dali``: image folders decoded by NVIDIA DALI (nvJPEG on a GPU, CPU operators elsewhere).

Same contract as the torch loader (``fastebm.data.loader.MicroBatchStream``): ``iterate(start_step,
end_step)`` yields one dict per micro-batch with ``images`` (uint8, (B, 3, S, S), values 0-255),
``labels`` and ``positions`` (int64, (B,), on the CPU), ``bad`` (the "path (reason)" of every
unreadable file met) and ``step``/``micro``. On a GPU the images are already on the device (decoded
by DALI's ``mixed`` decoder, resized and flipped there, copied device-to-device into a torch tensor),
so ``prepare_batch`` runs on them with no host round-trip.

Which samples a batch holds, and their crops, are the torch loader's, not DALI's:

* order: ``BatchPlan`` (epoch permutation from the seed; rank r takes its slice of every global
  micro-batch). Each epoch (or the rest of one, on resume) becomes one file list with every rank's
  samples laid out rank after rank, and ``fn.readers.file(shard_id=rank, num_shards=world,
  stick_to_shard=True, pad_last_batch=True, random_shuffle=False)`` reads this rank's part. Resuming
  mid-epoch rebuilds that list from the resume step: nothing before it is read again;
* crops: per sample, ``random_resized_crop_box`` and the flip draw with the generator seeded by
  (seed, epoch, dataset index), exactly as ``transforms.crop_flip_resize`` draws them, fed to
  ``fn.decoders.image_slice`` (ROI decoding of the box plus the resize filter's margin) through
  ``fn.external_source``; then ``fn.resize`` of the box (linear, antialiased), ``fn.flip``,
  ``fn.transpose`` to CHW. DALI's own
  ``image_random_crop`` is not used: its random state is per pipeline, so crops would depend on the
  number of processes and differ from the torch loader's. Results therefore do not depend on the
  world size, and DALI's images are the torch loader's up to the resize filter and the JPEG IDCT:
  on CPU a mean absolute difference of about 0.1 grey levels (a few levels at most); nvJPEG on a
  GPU is not measured here (no GPU with DALI);
* unreadable files: known from ``dali_index.build_index`` before the first batch and replaced by
  ``sampling.resolve_sample``, the rule the torch loader uses (the first readable file along
  ``substitute_order(n, seed, epoch, index)``), asked of the index instead of the decoder: the same
  substitute, its crop and flip drawn for the requested index, the same "path (reason)" reports in
  walk order, and the same one-line DataError when no file is readable. A batch DALI still fails on
  (a file that changed after indexing) is rebuilt on the host through the torch path, and the
  pipeline restarts after it.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .errors import DataError, unreadable_entry
from .loader import KeyedSamples, collate, no_readable_left
from .sampling import BatchPlan, SampleKey, epoch_order, resolve_sample
from .transforms import random_resized_crop_box
from .dali_index import BAD, FileIndex

INSTALL_COMMAND = 'pip install "fastebm[dali]"'


class DaliUnavailable(DataError):
    """--loader dali without NVIDIA DALI installed (the CLI exits with code 2)."""


def require_dali():
    """The ``nvidia.dali`` module, or DaliUnavailable with the install command."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError:
        raise DaliUnavailable(f"--loader dali: NVIDIA DALI is not installed; install it with: {INSTALL_COMMAND}") from None
    return dali


def dali_available() -> bool:
    try:
        require_dali()
        return True
    except DaliUnavailable:
        return False


def sample_crop(width: int, height: int, g: torch.Generator, scale=(0.2, 1.0)):
    """(left, top, w, h, flip): the draws of ``transforms.crop_flip_resize``, in its order."""
    left, top, w, h = random_resized_crop_box(width, height, g, scale=scale)
    flip = bool(torch.rand(1, generator=g).item() < 0.5)
    return left, top, w, h, flip


def crop_arguments(width: int, height: int, size: int, g: torch.Generator, scale=(0.2, 1.0)):
    """The DALI arguments of one sample's crop: slice start [x, y] and shape [w, h] (int32), resize
    ROI start and end [y, x] inside the slice (float32), flip (int32).

    The slice reaches a few pixels past the crop box (clamped to the image) because PIL's
    ``resize(box=...)`` in the torch loader filters with pixels just outside the box; resizing only the
    ROI of a wider slice reproduces that (mean |diff| 0.12 grey levels instead of 0.19 when cropping first).
    """
    left, top, w, h, flip = sample_crop(width, height, g, scale)
    margin = int(np.ceil(max(w, h) / size)) + 1  # the linear filter's reach when shrinking by w/size
    x0, y0 = max(0, left - margin), max(0, top - margin)
    x1, y1 = min(width, left + w + margin), min(height, top + h + margin)
    return (np.array([x0, y0], np.int32), np.array([x1 - x0, y1 - y0], np.int32),
            np.array([top - y0, left - x0], np.float32), np.array([top - y0 + h, left - x0 + w], np.float32),
            np.array(int(flip), np.int32))


def _build_pipeline(dali, files: List[str], shard_id: int, num_shards: int, batch_size: int, img_size: int,
                    crop_source, device_id: Optional[int], num_threads: int, seed: int):
    """One DALI pipeline over ``files`` (all ranks' lists, rank after rank); outputs (images CHW, list position)."""
    fn, types = dali.fn, dali.types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                         prefetch_queue_depth=2)
    with pipe:
        encoded, where = fn.readers.file(files=files, labels=list(range(len(files))), shard_id=shard_id,
                                         num_shards=num_shards, random_shuffle=False, pad_last_batch=True,
                                         stick_to_shard=True, name="reader")
        start, shape, roi_start, roi_end, flip = fn.external_source(source=crop_source, num_outputs=5, batch=True,
                                                                    batch_info=True)
        images = fn.decoders.image_slice(encoded, start=start, shape=shape, device="cpu" if device_id is None else "mixed",
                                         output_type=types.RGB)
        images = fn.resize(images, size=[img_size, img_size], roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.flip(images, horizontal=flip)
        pipe.set_outputs(fn.transpose(images, perm=[2, 0, 1]), where)
    pipe.build()
    return pipe


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI batch copied into a new torch tensor on ``device`` (device-to-device on a GPU)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
    # The copy is ordered on torch's current stream, as DALI's own PyTorch iterator does it.
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(dense, out, cuda_stream=stream)


def micro_batch(images: torch.Tensor, labels, positions, bad: List[str], step: int, micro: int) -> Dict:
    """The loader contract's dict; ``images`` is kept where it is (no copy, no device change)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or not images.is_contiguous():
        raise ValueError(f"a loader batch is contiguous uint8 (B, 3, S, S); got {images.dtype} {tuple(images.shape)}")
    return {"images": images, "labels": torch.as_tensor(labels, dtype=torch.long),
            "positions": torch.as_tensor(positions, dtype=torch.long), "bad": list(bad), "step": step, "micro": micro}


class DaliMicroBatchStream:
    """This rank's micro-batches from DALI; drop-in for ``MicroBatchStream`` (see the module docstring).

    ``source`` is an ``ImageFolderData`` (paths, labels, img_size, seed, crop_scale), ``index`` its
    ``build_index`` result, ``device`` where the images end up: a CUDA device uses the ``mixed``
    decoder on that GPU, anything else runs DALI's CPU operators (``device_id=None``).
    """

    def __init__(self, source, plan: BatchPlan, index: FileIndex, device: torch.device, num_threads: int = 1):
        self.dali = require_dali()
        if len(index) != len(source.paths):
            raise ValueError(f"the file index has {len(index)} entries, the data {len(source.paths)}")
        self.source, self.plan, self.index = source, plan, index
        self.device = torch.device(device)
        self.device_id = None if self.device.type != "cuda" else (
            self.device.index if self.device.index is not None else torch.cuda.current_device())
        self.num_threads = max(1, int(num_threads))
        self.bad = np.array([r.kind == BAD for r in index.records], dtype=bool)
        self.read_paths = [r.read_path for r in index.records]
        self.host_fallbacks = 0  # batches DALI failed on and the torch path rebuilt

    # ------------------------------------------------------------------ planning
    def _resolve(self, epoch: int, indices: np.ndarray) -> Tuple[np.ndarray, Dict[int, List[str]]]:
        """The index DALI reads for each of ``indices`` (same shape) and, per unreadable one among them,
        the "path (reason)" reports the torch loader gives with that sample; DataError if nothing is readable."""
        n, resolved = len(self.index), indices.copy()
        substitutes, reports = {}, {}
        unreadable = self.bad[indices]
        # A readable index is its own sample (resolve_sample's first step): only bad ones walk. In the
        # order they are loaded, so a data set with nothing readable names the torch loader's example.
        for i in dict.fromkeys(indices[unreadable].tolist()):
            chosen, walked = resolve_sample(n, self.plan.seed, epoch, i, lambda j: not self.bad[j])
            reports[i] = [unreadable_entry(self.index.paths[j], self.index.records[j].reason) for j in walked]
            if chosen is None:
                raise DataError(f"--data: {no_readable_left(n, reports[i][0])}")
            substitutes[i] = chosen
        resolved[unreadable] = [substitutes[i] for i in indices[unreadable].tolist()]
        return resolved, reports

    def _positions(self, first_micro: int, count: int) -> np.ndarray:
        """(count, world, B) global positions of micro-batches first_micro.. of the epoch (BatchPlan's layout)."""
        p = self.plan
        return ((first_micro + np.arange(count))[:, None, None] * p.global_micro_batch
                + np.arange(p.world_size)[None, :, None] * p.batch_size + np.arange(p.batch_size)[None, None, :])

    def _crops(self, epoch: int, resolved: np.ndarray, requested: np.ndarray):
        """external_source callback: batch ``i`` -> per sample the decoded slice ([x, y], [w, h]), the
        crop inside it ([y, x] start and end) and the flip: drawn for the requested index, from the
        size of the file read (a substitute's crop is the requested sample's draw, as in the torch loader)."""
        src, B = self.source, self.plan.batch_size

        def crops(info):
            row = info.iteration % len(resolved)  # past the end: the reader's read-ahead, discarded
            columns = [[] for _ in range(5)]
            for i, want in zip(resolved[row].tolist(), requested[row].tolist()):
                rec = self.index.records[i]
                g = src.crop_generator(epoch, want)
                for column, value in zip(columns, crop_arguments(rec.width, rec.height, src.img_size, g, src.crop_scale)):
                    column.append(value)
            assert len(columns[0]) == B
            return columns

        return crops

    # ------------------------------------------------------------------ iteration
    def iterate(self, start_step: int, end_step: Optional[int] = None) -> Iterator[Dict]:
        """Micro-batches of optimiser steps [start_step, end_step), epoch after epoch; each carries 'step' and 'micro'."""
        for epoch, schedule in self.plan.epoch_parts(start_step, end_step):
            yield from self._epoch_part(epoch, schedule)

    def _epoch_part(self, epoch: int, schedule: List[Tuple[int, int]]) -> Iterator[Dict]:
        p = self.plan
        first_micro = (schedule[0][0] - epoch * p.steps_per_epoch) * p.accum_iter
        order = epoch_order(p.num_samples, p.seed, epoch).numpy()
        done = 0
        while done < len(schedule):
            positions = self._positions(first_micro + done, len(schedule) - done)  # (count, world, B)
            original = order[positions]
            resolved, reports = self._resolve(epoch, original)
            files = [self.read_paths[i] for i in resolved.transpose(1, 0, 2).reshape(-1).tolist()]
            mine = resolved[:, p.rank]
            pipe = _build_pipeline(self.dali, files, p.rank, p.world_size, p.batch_size, self.source.img_size,
                                   self._crops(epoch, mine, original[:, p.rank]), self.device_id, self.num_threads,
                                   p.seed % 2**31)
            list_start = p.rank * len(mine) * p.batch_size
            for j in range(len(schedule) - done):
                s, m = schedule[done]
                bad = [b for i in original[j, p.rank].tolist() for b in reports.get(i, ())]
                labels = [self.source.labels[i] for i in mine[j].tolist()]
                try:
                    images, where = pipe.run()
                except RuntimeError as exc:
                    yield self._host_batch(epoch, original[j, p.rank], positions[j, p.rank], s, m, exc)
                    done += 1
                    break  # the pipeline is unusable after an error: rebuild from the next micro-batch
                got = np.array(where.as_tensor()).reshape(-1)
                expected = list_start + j * p.batch_size + np.arange(p.batch_size)
                if not np.array_equal(got, expected):  # the reader's order is what this code relies on
                    raise RuntimeError(f"DALI reader returned list positions {got.tolist()}, expected {expected.tolist()}")
                yield micro_batch(to_torch(images, self.device), labels, positions[j, p.rank], bad, s, m)
                done += 1
            del pipe

    def _host_batch(self, epoch: int, indices: np.ndarray, positions: np.ndarray, step: int, micro: int, exc) -> Dict:
        """The torch loader's batch for these keys (decode_image + crop_flip_resize), after DALI failed on it."""
        self.host_fallbacks += 1
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # DALI's message: "... encountered:" then the decoder's own error, then boilerplate
        reason = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[0]
        warnings.warn(f"DALI failed on a batch of step {step} ({reason[:200]}); decoded it with the torch loader "
                      f"instead (a file changed after the index was built? the next run re-checks changed files)")
        dataset = KeyedSamples(self.source, seed=self.plan.seed)
        items = [dataset[SampleKey(epoch, int(i), int(q))] for i, q in zip(indices.tolist(), positions.tolist())]
        batch = collate(items)
        if "fatal" in batch:
            raise DataError(f"--data: {batch['fatal']}")
        return micro_batch(batch["images"].to(self.device), batch["labels"], batch["positions"], batch["bad"], step, micro)
