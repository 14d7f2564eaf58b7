"""Errors of the data layer: :class:`DataError` (defined in :mod:`fastebm.errors` with the others)."""
from ..errors import DataError

__all__ = ["DataError"]
