"""The metrics window kept on the device: the loop reads numbers to the host only at log steps.

A read of a device tensor (``.item()``, ``float()``, ``.tolist()``, ``.cpu()``) makes the host wait
until the GPU has run everything queued so far, so a read per micro-step keeps the GPU idle while
Python prepares the next step. :class:`MetricsWindow` adds each micro-batch's loss and statistics,
each optimiser step's gradient norm and its skip verdict to device tensors; the trainer reads them
twice per logging interval (:meth:`MetricsWindow.take_verdicts` and
:meth:`MetricsWindow.take_means`) and before a checkpoint.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import distributed


def stat_vector(stats: Dict[str, Any], device: torch.device) -> Tuple[List[str], torch.Tensor]:
    """Names and float64 values of :func:`fastebm.runlog.flatten_stats`, left on ``device``.

    ``{'loss_t': tensor([a, b]), 'energy': tensor(c)}`` -> (``['loss_t/1', 'loss_t/2', 'energy']``,
    ``tensor([a, b, c], float64)``). Names come from the shapes, so nothing is read from the device;
    entries that are neither tensors nor numbers are left out, as by ``flatten_stats``.
    """
    names: List[str] = []
    parts: List[torch.Tensor] = []
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1).to(torch.float64)
        elif isinstance(value, (int, float)):
            flat = torch.tensor([float(value)], dtype=torch.float64).to(device, non_blocking=True)
        else:
            continue
        names.extend([key] if flat.numel() == 1 else [f"{key}/{i + 1}" for i in range(flat.numel())])
        parts.append(flat.to(device))
    values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    return names, values


class MetricsWindow:
    """Loss, statistics, gradient norm and skip verdicts of the steps since the last read, on the device.

    Per optimiser step: :meth:`start_step`, then :meth:`add_micro_step` for each micro-batch (loss
    and statistics weighted ``1/accum_iter``, and whether the loss is finite), then
    :meth:`end_step` with the step's verdict, agreed across ranks. A skipped step queues its
    verdict but adds nothing to the sums (``torch.where``: a NaN never reaches them), so the means
    are over the good steps, as ``metrics.jsonl`` has always reported them. Keys, in record order:
    the statistics, ``loss``, ``grad_norm``.
    """

    def __init__(self, device: torch.device, accum_iter: int):
        self.device, self.accum_iter = device, accum_iter
        self._step_keys: Optional[List[str]] = None  # the statistics' names and "loss", fixed by the first micro-batch
        self._verdicts: List[Tuple[int, torch.Tensor]] = []
        self.reset()
        self.start_step()

    def reset(self) -> None:
        """A new logging interval (queued verdicts stay until :meth:`take_verdicts`)."""
        self._sums: Optional[torch.Tensor] = None
        self._good: Optional[torch.Tensor] = None
        self.images, self.start = 0, time.time()

    def start_step(self) -> None:
        """Before the first micro-batch of an optimiser step."""
        self._step_sum: Optional[torch.Tensor] = None
        self._step_bad: Optional[torch.Tensor] = None

    def add_micro_step(self, loss: torch.Tensor, stats: Dict[str, Any]) -> None:
        """One micro-batch's loss (a scalar tensor) and statistics; no host read."""
        loss = loss.detach()
        names, values = stat_vector(stats, self.device)
        keys = names + ["loss"]
        if self._step_keys is None:
            self._step_keys = keys
        elif keys != self._step_keys:
            raise ValueError(f"the objective's statistics changed during the run: {keys} != {self._step_keys}")
        row = torch.cat([values, loss.to(torch.float64).reshape(1)]) / self.accum_iter
        bad = ~torch.isfinite(loss)
        self._step_sum = row if self._step_sum is None else self._step_sum + row
        self._step_bad = bad if self._step_bad is None else self._step_bad | bad

    @property
    def step_bad(self) -> torch.Tensor:
        """This rank's verdict so far on the current step: True if any micro-batch loss was non-finite."""
        if self._step_bad is None:
            raise RuntimeError("no micro-batch was added to this optimiser step")
        return self._step_bad

    def end_step(self, step: int, bad: torch.Tensor, grad_norm: torch.Tensor, images: int) -> None:
        """Closes optimiser step ``step``: ``bad`` is the agreed verdict (bool), ``grad_norm`` a scalar tensor."""
        good = ~bad.reshape(())
        row = torch.cat([self._step_sum, grad_norm.detach().to(self.device, torch.float64).reshape(1)])
        row = torch.where(good, row, torch.zeros_like(row))
        self._sums = row if self._sums is None else self._sums + row
        g = good.to(torch.float64)
        self._good = g if self._good is None else self._good + g
        self._verdicts.append((step, bad.reshape(())))
        self.images += images
        self.start_step()

    def take_verdicts(self) -> List[Tuple[int, bool]]:
        """``[(step, skipped)]`` of the steps since the last call, oldest first: one host read."""
        if not self._verdicts:
            return []
        flags = torch.stack([b for _, b in self._verdicts]).tolist()
        out = [(s, bool(f)) for (s, _), f in zip(self._verdicts, flags)]
        self._verdicts.clear()
        return out

    def take_means(self) -> Dict[str, float]:
        """Means over the window's good steps (averaged over ranks; a collective with a process group).

        Every rank must call it at the same step (the verdicts, hence the counts, agree). Empty when
        the window has no good step. One host read. Starts a new window.
        """
        means: Dict[str, float] = {}
        if self._sums is not None:
            packed = torch.cat([self._good.reshape(1), self._sums])
            if distributed.world_size() > 1:  # same count on every rank: mean of means == mean of sums / count
                packed = distributed.all_reduce_mean(packed)
            count, *sums = packed.tolist()
            if count > 0:
                means = {k: v / count for k, v in zip(self._step_keys + ["grad_norm"], sums)}
        self.reset()
        return means
