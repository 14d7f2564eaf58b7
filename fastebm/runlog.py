"""Run logging: metrics.jsonl, TensorBoard events, and the console (tqdm bar or plain lines).

Only the main process writes (the caller passes ``enabled=distributed.is_main()``).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from .files import remove_files

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"  # TensorBoard event files


def flatten_stats(stats: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """{'loss_t': tensor([a, b])} -> {'loss_t/1': a, 'loss_t/2': b}; scalars stay scalars (steps count from 1)."""
    out: Dict[str, float] = {}
    for key, value in stats.items():
        name = prefix + key
        if isinstance(value, torch.Tensor):
            flat = value.detach().float().flatten().cpu().tolist()
            if len(flat) == 1:
                out[name] = flat[0]
            else:
                for i, v in enumerate(flat):
                    out[f"{name}/{i + 1}"] = v
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def read_metrics(output_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(output_dir, METRICS_FILE)
    records = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a crash: ignore it
                        pass
    return records


def _drop_earlier_events(tb_dir: str) -> None:
    """A new run replaces the earlier run's TensorBoard event files as it replaces its metrics.jsonl: left
    beside the new file they would draw both runs as one curve (a repeated fastebm-eval command). Only
    files inside the output folder go: a ``tb`` that links elsewhere may be shared by other runs."""
    if os.path.islink(tb_dir):
        log.warning(f"{tb_dir} is a link: the new run's TensorBoard events are written beside the earlier ones "
                    "there (fastebm deletes nothing outside its output folder)")
        return
    old = [p for p in glob.glob(os.path.join(glob.escape(tb_dir), "events.out.tfevents.*"))
           if os.path.islink(p) or not os.path.isdir(p)]
    removed = remove_files(old, flag="starting a new run's TensorBoard log")
    if removed:
        log.info(f"removed {removed} TensorBoard event file(s) of the earlier run from {tb_dir}")


class MetricsLogger:
    """Appends one JSON object per logging interval and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str, enabled: bool = True, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        if resume_step is None:
            open(self.path, "w").close()
            if tensorboard:
                _drop_earlier_events(os.path.join(output_dir, TB_DIR))
        else:
            # A run killed after its last checkpoint logged steps that the resumed run will redo.
            kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as fh:
                for r in kept:
                    fh.write(json.dumps(r) + "\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(output_dir, TB_DIR), purge_step=resume_step)
            except Exception as exc:  # tensorboard missing or broken: metrics.jsonl still has everything
                log.warning(f"TensorBoard logging off ({exc})")

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class Console:
    """A tqdm bar on a terminal (loss, img/s, ETA); otherwise one plain line per logging interval."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.total = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self.bar = None
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=self.stream)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, step: int, epoch: int, loss: float, img_per_s: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_per_s:.0f}", lr=f"{lr:.2e}", refresh=False)
            return
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.3e} {img_per_s:.1f} img/s "
              f"eta {_fmt_time(eta)}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
