"""``--output_dir``: checked before anything is read or written, created (or cleared) only when the run starts.

Two mistakes used to cost a finished run or end in a traceback:

* a folder that already holds a run (``last.pt``, ``metrics.jsonl`` or ``config.yaml``), started
  again without ``--resume``: its metrics were truncated and its config rewritten before a later
  error showed up. Now such a folder is refused (exit 2) unless ``--resume`` (continue it) or
  ``--overwrite`` (delete it first) says what to do, and nothing is touched before every other
  check has passed (``Trainer.start``);
* an output path that cannot be written (a read-only folder, a path under a regular file, an
  existing file): now one line naming the path (:class:`~fastebm.errors.OutputError`, exit 2);
* a folder holding another command's results (``fastebm-eval``'s ``summary.json`` or fine-tuning
  ``checkpoint.pt``): its ``metrics.jsonl`` looked like a run, so ``--resume auto`` started from
  scratch over it and ``--overwrite`` deleted its summary. Now it is refused whatever the flags.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import List, Optional

from .. import distributed
from ..checkpoint import FINETUNE_CHECKPOINT, LAST, PREVIOUS, TRAIN_CONFIG
from ..errors import FastEBMError, OutputError, UsageError
from ..files import remove_files
from .checkpoint import EPOCH_CHECKPOINT
from .config import TrainConfig

log = logging.getLogger(__name__)

# Files whose presence means the folder holds a run.
RUN_MARKERS = (LAST, PREVIOUS, "metrics.jsonl", TRAIN_CONFIG)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def writable_problem(output_dir: str) -> Optional[str]:
    """Why ``output_dir`` cannot be used for outputs (one line naming the path), or None.

    Checks without writing: an existing path must be a folder we may write in; a missing one must
    lie under a folder we may write in (it is created later). ``os.access`` honours read-only
    mounts (EROFS) and the effective user (root may write in a chmod 555 folder, so that is fine).
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return f"--output_dir {output_dir!r} is an existing file, not a folder; give a folder path"
    exists = os.path.isdir(output_dir)
    base = output_dir if exists else _nearest_existing(output_dir)
    if not os.path.isdir(base):
        return (f"--output_dir {output_dir!r} cannot be created: {base!r} is a file, not a folder; "
                f"give a path under a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        what = "is" if exists else f"would be created in {base!r}, which is"
        return f"--output_dir {output_dir!r} {what} not writable (read-only or no permission); choose a writable folder"
    return None


def run_files(output_dir: str) -> List[str]:
    """The :data:`RUN_MARKERS` present in ``output_dir``."""
    return [name for name in RUN_MARKERS if os.path.isfile(os.path.join(output_dir, name))]


def other_commands_results(output_dir: str) -> Optional[str]:
    """What in ``output_dir`` another command wrote, which a training run there would overwrite, or None:
    a fine-tuning checkpoint, or a ``summary.json`` naming a ``command`` (fastebm-eval's do;
    fastebm-train's never does). Only positive evidence counts: an unreadable summary is left to the run."""
    if os.path.isfile(os.path.join(output_dir, FINETUNE_CHECKPOINT)):
        return f"a fastebm-eval finetune run ({FINETUNE_CHECKPOINT})"
    try:
        with open(os.path.join(output_dir, "summary.json"), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return None
    command = record.get("command") if isinstance(record, dict) else None
    return f"another command's results (its summary.json names command {command!r})" if isinstance(command, str) else None


def output_dir_problem(cfg: TrainConfig) -> Optional[FastEBMError]:
    """OutputError for an unwritable ``--output_dir``; UsageError for one holding another command's
    results (whatever the flags), or a run started without ``--resume``/``--overwrite``; else None.
    Reads only."""
    problem = writable_problem(cfg.output_dir)
    if problem:
        return OutputError(problem)
    other = other_commands_results(cfg.output_dir) if os.path.isdir(cfg.output_dir) else None
    if other:
        return UsageError(f"--output_dir {cfg.output_dir!r} holds {other}; fastebm-train never trains over them, "
                          f"even with --resume or --overwrite: give another --output_dir")
    found = run_files(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []
    if found and cfg.resume is None and not cfg.overwrite:
        return UsageError(f"--output_dir {cfg.output_dir!r} holds a run ({', '.join(found)}): continue it with "
                          f"--resume auto, start it again with --overwrite (deletes its checkpoints, metrics and "
                          f"pictures), or give another --output_dir")
    return None


def check_output_dir(cfg: TrainConfig) -> None:
    """Raises :func:`output_dir_problem`'s error on every rank. Collective: rank 0 (the process that
    writes; other nodes may not even see its folder) checks, the others take its verdict."""
    problem = output_dir_problem(cfg) if distributed.is_main() else None
    kind, text = distributed.all_gather_object((type(problem).__name__, str(problem)) if problem else (None, None))[0]
    if kind is not None:
        raise (OutputError if kind == "OutputError" else UsageError)(text)


def prepare_output_dir(cfg: TrainConfig) -> None:
    """Creates ``--output_dir``; with ``--overwrite``, first deletes the earlier run's outputs
    (checkpoints, metrics, pictures, summary, config, backbone) and nothing else. Its TensorBoard events
    go when the new run's log starts (runlog.MetricsLogger, which leaves a linked ``tb/`` alone)."""
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --output_dir {cfg.output_dir!r}: {exc.strerror or exc}") from None
    if not cfg.overwrite:
        return
    from .pictures import GRID_FILE, LOSS_FILE

    names = [LAST, PREVIOUS, "metrics.jsonl", "summary.json", TRAIN_CONFIG, "backbone.pth", GRID_FILE, LOSS_FILE]
    paths = [os.path.join(cfg.output_dir, n) for n in names]
    paths += glob.glob(os.path.join(glob.escape(cfg.output_dir), EPOCH_CHECKPOINT.format(epoch="*")))
    paths += glob.glob(os.path.join(glob.escape(cfg.output_dir), LAST + ".damaged*"))  # set aside by a fallback resume
    removed = remove_files(paths)
    if removed:
        log.info(f"--overwrite: deleted {removed} file(s) of the earlier run in {cfg.output_dir}")
