"""Errors of the restoration and scoring tools."""
from ..errors import UsageError


class ToolInputError(UsageError):
    """Bad input to fastebm-restore / fastebm-score (no images, a task that does not fit the model,
    bad step count or tiling, an output folder that cannot be written): the CLI prints it on one
    line and exits with code 2."""
