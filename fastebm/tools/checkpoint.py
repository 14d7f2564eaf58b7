"""Where the tools get their energy model: a ``fastebm-train`` checkpoint -> ``RestorationObjective``.

The only module of :mod:`fastebm.tools` that reads checkpoints (the import of ``load_checkpoint``
below is the single place to repoint when checkpoint I/O moves out of ``fastebm.train``). The
objective is rebuilt from the checkpoint's own config (preset, image size, energy head, T, step-size
initialisation, noise) and its weights (the model and the learned step sizes) are loaded strictly.
The tools only need first-order ``dE/dx``, so the objective always uses the ``eager`` engine,
whatever engine trained it (all engines share the same weights).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch

from ..models import PRESETS, create_model
from ..restore import RestorationObjective
from ..checkpoint import load_checkpoint
from ..errors import CheckpointError
from .errors import ToolInputError


def objective_from_config(config: Dict[str, Any]) -> RestorationObjective:
    """A freshly initialised objective (draws from the global torch RNG) shaped as ``config`` says.

    ``config`` is a training config dict (``TrainConfig.to_dict()``): keys ``model``, ``img_size``,
    ``energy``, ``steps``, ``alpha_init``, ``noise_sigma``. Raises ToolInputError for an unknown preset.
    """
    name = config.get("model")
    if name not in PRESETS:
        raise ToolInputError(f"the checkpoint's model {name!r} is not a preset of this fastebm version "
                             f"({', '.join(sorted(PRESETS))}); use a fastebm-train checkpoint made by this version")
    model = create_model(name, img_size=config.get("img_size"), energy=config.get("energy", "sqnorm"))
    kw = {} if config.get("alpha_init") is None else {"alpha_init": float(config["alpha_init"])}
    return RestorationObjective(model, steps=int(config.get("steps", 2)), noise_sigma=float(config.get("noise_sigma") or 0.0),
                                engine="eager", **kw)


def load_objective(path: str, device="cpu") -> Tuple[RestorationObjective, Dict[str, Any]]:
    """(objective in eval mode on ``device``, the checkpoint's training config) from ``last.pt``.

    Raises ToolInputError (one line naming the file) when the file is missing, unreadable, not a
    fastebm training checkpoint (e.g. an exported ``backbone.pth``), or does not fit its own config.
    """
    path = os.fspath(path)
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        raise ToolInputError(f"--ckpt: {exc}") from None
    config = state.get("config")
    if not isinstance(config, dict):
        raise ToolInputError(f"--ckpt: checkpoint {path} holds no training config; it is not a fastebm-train checkpoint")
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
        objective = objective_from_config(config)
    try:
        objective.load_state_dict(state["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ToolInputError(f"--ckpt: checkpoint {path} does not fit its own config ({config.get('model')}): "
                             f"{str(exc).splitlines()[0][:200]}") from None
    return objective.to(device).eval(), config


def random_init_objective(config: Dict[str, Any], seed: int, device="cpu") -> RestorationObjective:
    """The same architecture and step sizes as ``config`` at initialisation (weights drawn with ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        objective = objective_from_config(config)
    return objective.to(device).eval()
