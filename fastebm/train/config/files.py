"""The YAML config file: ``--config FILE.yaml`` in, ``OUTPUT_DIR/config.yaml`` out.

Keys are flag names (aliases and deprecated names accepted, :mod:`.flags`); each value is
converted and checked by the flag's own converter, so a file is checked like a command line.
A written ``config.yaml`` can be given back to ``--config`` as it is.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict

import yaml

from ...errors import UsageError
from .fields import NOT_SAVED, TrainConfig
from .flags import ALIASES, DEPRECATED, field_choices, field_type, is_list, warn_deprecated


def load_yaml(path: str) -> Dict[str, Any]:
    """The file's mapping with every key a field name (aliases and deprecated names resolved)."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must be a mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: Dict[str, Any] = {}
    spelled: Dict[str, str] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        name = ALIASES.get(key) or DEPRECATED.get(key) or key
        if name not in names:
            raise UsageError(f"config file {path!r} has unknown key {key!r}; keys are flag names such as batch_size")
        if key in DEPRECATED:
            warn_deprecated(key, f"config file {path!r}: key ", stacklevel=4)  # names parse_config
        if name in out:
            raise UsageError(f"config file {path!r} gives {name} twice (as {spelled[name]} and {key}); keep one")
        out[name], spelled[name] = value, key
    return out


def _coerce_yaml_value(f: dataclasses.Field, value: Any) -> Any:
    """Applies the flag's own converter so that a YAML value is checked like a typed flag."""
    if is_list(f):
        item = field_type(f)
        return [item(v) for v in value] if isinstance(value, (list, tuple)) else [item(value)]
    if value is None:
        return None
    try:
        return field_type(f)(value if not isinstance(value, bool) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UsageError(f"config key {f.name}: invalid value {value!r}") from None


def read_config_file(path: str) -> Dict[str, Any]:
    """``{field: converted value}`` of a ``--config`` file; UsageError for a bad key, value or choice."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {k: _coerce_yaml_value(fields[k], v) for k, v in load_yaml(path).items()}
    for k, v in values.items():
        choices = field_choices(fields[k])
        if choices is not None and v not in choices:
            raise UsageError(f"config key {k}: {v!r} is not one of {list(choices)}")
    return values


def save_yaml(cfg: TrainConfig, path: str) -> None:
    """The resolved configuration as YAML (flag names as keys), written atomically.

    Leaves out :data:`~.fields.NOT_SAVED` (``overwrite``) and, when ``lr`` is set, ``blr`` (unused
    then), so that the file can be given back to ``--config`` as it is.
    """
    from ...files import atomic_write

    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SAVED and not (k == "blr" and cfg.lr is not None)}
    text = yaml.safe_dump(values, sort_keys=False)
    atomic_write(path, lambda fh: fh.write(text.encode()))
