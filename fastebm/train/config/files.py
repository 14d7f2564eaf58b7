"""The YAML config file: ``--config FILE.yaml`` in, ``OUTPUT_DIR/config.yaml`` out.

Keys are flag names (aliases and deprecated names accepted, :mod:`.flags`); each value is
converted and checked by the flag's own converter, so a file is checked like a command line.
A written ``config.yaml`` can be given back to ``--config`` as it is.
"""
from __future__ import annotations

from typing import Any, Dict

import yaml

from ... import settings
from .fields import NOT_SAVED, TrainConfig
from .flags import ALIASES, DEPRECATED, warn_deprecated


def read_config_file(path: str) -> Dict[str, Any]:
    """``{field: converted value}`` of a ``--config`` file (:func:`fastebm.settings.read_config_file`
    with the MAE aliases and the deprecated names, which warn); UsageError for a bad key, value or choice."""
    def deprecated(key: str) -> None:
        if key in DEPRECATED:  # stacklevel 5 names parse_config (via settings.read_config_file and this function)
            warn_deprecated(key, f"config file {path!r}: key ", stacklevel=5)

    return settings.read_config_file(path, TrainConfig, {**ALIASES, **DEPRECATED}, on_alias=deprecated)


def save_yaml(cfg: TrainConfig, path: str) -> None:
    """The resolved configuration as YAML (flag names as keys), written atomically.

    Leaves out :data:`~.fields.NOT_SAVED` (``overwrite``) and, when ``lr`` is set, ``blr`` (unused
    then), so that the file can be given back to ``--config`` as it is.
    """
    from ...files import atomic_write

    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SAVED and not (k == "blr" and cfg.lr is not None)}
    text = yaml.safe_dump(values, sort_keys=False)
    atomic_write(path, lambda fh: fh.write(text.encode()))
