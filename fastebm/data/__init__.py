"""Data sources for pretraining: image folders and built-in demo data (uint8 images out)."""
from .errors import DataError

__all__ = ["DataError"]
