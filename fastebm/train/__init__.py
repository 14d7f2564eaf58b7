"""Training core of ``fastebm-train``: config, the :class:`~fastebm.train.trainer.Trainer`, optimiser and
schedule, checkpoint contents, metrics, pictures, faults. The command line is :mod:`fastebm.cli.train`."""
from .config import TrainConfig, parse_config

__all__ = ["TrainConfig", "parse_config", "train"]


def train(cfg: TrainConfig):
    """Runs a training job (see :func:`fastebm.train.job.train`)."""
    from .job import train as _train

    return _train(cfg)
