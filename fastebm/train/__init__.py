"""Training core of ``fastebm-train``: config, loop, optimiser/schedule, checkpoints, logging, faults."""
from .config import TrainConfig, UsageError, parse_config

__all__ = ["TrainConfig", "UsageError", "parse_config", "train"]


def train(cfg: TrainConfig):
    """Runs a training job (see :func:`fastebm.train.loop.train`)."""
    from .loop import train as _train

    return _train(cfg)
