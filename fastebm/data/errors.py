"""Errors of the data layer."""


class DataError(ValueError):
    """The data source cannot be used as given (missing/empty folder, nothing readable, --strict_data)."""
