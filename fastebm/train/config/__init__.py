"""Training configuration: command line and YAML file -> one checked :class:`TrainConfig`.

Every field is a flag of ``fastebm-train`` (same name) and a key of the YAML config file
(``--config FILE.yaml``); flags given on the command line override the file. MAE's names are
accepted where they mean the same (:data:`ALIASES`: ``--input_size``, ``--data_path``), on the
command line and in the file; ``--eval`` is a deprecated alias of ``--demo_eval``. The defaults
run the built-in demo (``fastebm-train`` with no arguments); ``configs/`` holds starting points
for real data.

    fields.py   the dataclass: every field, its default and help
    flags.py    the argparse parser derived from the fields; aliases, deprecated names
    files.py    the YAML file in (``--config``) and out (``OUTPUT_DIR/config.yaml``)
    checks.py   checks argparse cannot make (ranges, contradictions, the loader)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from ...errors import UsageError
from .checks import check_loader, resolve_lr, split_tasks, validate
from .fields import NOT_SAVED, PRECISIONS, TrainConfig, attn_backend_choices
from .files import read_config_file, save_yaml
from .flags import ALIASES, DEPRECATED, build_parser, deprecated_dest, given_on_command_line, warn_deprecated

__all__ = ["TrainConfig", "parse_config", "build_parser", "validate", "save_yaml", "check_loader", "split_tasks",
           "ALIASES", "DEPRECATED", "NOT_SAVED", "PRECISIONS", "attn_backend_choices"]


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """Command line (and optional YAML file) -> checked TrainConfig.

    Raises UsageError (bad values, contradictions), DataError (``--loader dali`` without DALI) or
    SystemExit(0) after ``--help`` / ``--version``.
    """
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    from_file: Dict[str, Any] = {}
    if pre.config:
        from_file = read_config_file(pre.config)
        parser.set_defaults(**from_file)
    ns = parser.parse_args(argv)
    given = given_on_command_line(parser, argv)
    for old, name in DEPRECATED.items():
        value = getattr(ns, deprecated_dest(old))
        if value is None:
            continue
        warn_deprecated(old, "--")
        if name in given:
            raise UsageError(f"--{old} and --{name} both given; --{old} is the old name of --{name}: keep --{name}")
        setattr(ns, name, value)
        given.add(name)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig)}
    resolve_lr(values, given, set(from_file))
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg
