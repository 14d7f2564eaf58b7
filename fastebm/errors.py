"""The errors fastebm diagnoses itself, named by what went wrong (not by how a program reacts).

Every one carries a complete one-line message that names the problem and, where there is one, the
fix. Library code raises them; only the command-line layer (``fastebm.cli``) turns them into exit
codes. They derive from :class:`FastEBMError` and from the built-in class they refine
(``ValueError`` for input that cannot be used, ``RuntimeError`` for a run that went wrong), so
callers that catch the built-in classes keep working.

This module imports nothing from fastebm, so every layer can raise these.
"""
from __future__ import annotations

__all__ = ["FastEBMError", "UsageError", "DataError", "CheckpointError", "OutputError", "TrainingDiverged",
           "DistributedSetupError", "DistributedFailure"]


class FastEBMError(Exception):
    """Base of the errors below: a failure fastebm recognised and explained in its message."""


class UsageError(FastEBMError, ValueError):
    """The requested run cannot be done as configured: a flag or config-file value is invalid, or
    settings contradict each other or the model (e.g. ``--img_size`` not divisible by the patch)."""


class DataError(FastEBMError, ValueError):
    """The data source cannot be used as given (missing/empty folder, nothing readable, --strict_data)."""


class CheckpointError(FastEBMError, ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt, not a fastebm training
    checkpoint, or one whose tensors do not fit the model being trained."""


class OutputError(FastEBMError, OSError):
    """An output cannot be written where asked: ``--output_dir`` is a file, lies under a file, is
    read-only, or a write failed later (disk full, permissions changed); the message names the path.
    An ``OSError``, so callers that catch file-system errors keep working."""


class TrainingDiverged(FastEBMError, RuntimeError):
    """Training produced too many non-finite losses or gradients in a row (``--max_bad_steps``),
    or was about to checkpoint non-finite parameters."""


class DistributedSetupError(FastEBMError, ValueError):
    """The multi-process configuration is unusable: launcher environment, device or backend."""


class DistributedFailure(FastEBMError, RuntimeError):
    """A peer process died, hung or became unreachable during a collective; the message names it."""
