"""Errors of the data layer: :class:`DataError` (defined in :mod:`fastebm.errors` with the others) and
:class:`UnreadableImage`, which never leaves the data layer as a failure (the loaders replace the file)."""
from ..errors import DataError

__all__ = ["DataError", "UnreadableImage", "unreadable_entry"]


class UnreadableImage(Exception):
    """One file that cannot be decoded to an RGB image (truncated, corrupt, unsupported format or mode).

    Not fatal: the loader replaces the sample and reports ``path`` with ``reason``.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def unreadable_entry(path: str, reason: str) -> str:
    """How an unreadable file is reported in a batch's ``"bad"`` list and in summary.json: "path (reason)"."""
    return f"{path} ({reason})"
