"""The pieces of the training package that evaluation reuses, imported in this one place.

Evaluation must not depend on ``fastebm.train`` (docs/design.md §3: cli -> train/eval ->
restore/models/data -> ops). These helpers live there today; when they move to neutral modules
(checkpoint I/O, errors, run logging), only the imports below change.
"""
from __future__ import annotations

from .. import distributed  # noqa: F401  (process group, DDP wrapping, collectives)
from ..train.checkpoint import FORMAT as TRAIN_CHECKPOINT_FORMAT  # noqa: F401
from ..train.checkpoint import REQUIRED_KEYS as TRAIN_CHECKPOINT_KEYS  # noqa: F401
from ..train.checkpoint import atomic_torch_save  # noqa: F401
from ..train.config import UsageError  # noqa: F401
from ..train.faults import StopRequest, TrainingDiverged  # noqa: F401
from ..train.metrics import Console, MetricsLogger  # noqa: F401

__all__ = ["distributed", "TRAIN_CHECKPOINT_FORMAT", "TRAIN_CHECKPOINT_KEYS", "atomic_torch_save", "UsageError",
           "StopRequest", "TrainingDiverged", "Console", "MetricsLogger"]
