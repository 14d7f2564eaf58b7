"""The command line of ``fastebm-train``: one flag per :class:`~.fields.TrainConfig` field.

A flag's type, ``nargs`` and choices come from the field's annotation and metadata
(:func:`fastebm.settings.add_field_flags`), so a new field is a new flag with nothing else to
write. MAE's names are accepted where they mean the same (:data:`ALIASES`: ``--input_size``,
``--data_path``), on the command line and in the config file; ``--eval`` is a deprecated alias of
``--demo_eval`` (:data:`DEPRECATED`).
"""
from __future__ import annotations

import argparse
import warnings
from typing import List, Optional

from ... import __version__
from ...settings import ArgumentParser, FieldHelpFormatter, add_config_flag, add_field_flags, parse_bool
from .fields import TrainConfig

# Other tools' flag names with the same meaning (MAE's main_pretrain.py): alias -> field.
ALIASES = {"input_size": "img_size", "data_path": "data"}
# Old names that still work but warn: old -> field.
DEPRECATED = {"eval": "demo_eval"}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every flag (defaults: the fields' defaults; ``--config FILE`` sets others first)."""
    parser = ArgumentParser(
        prog="fastebm-train",
        description="Energy-inspired self-supervised pretraining of a ViT. With no arguments it pretrains "
        "vit_demo on built-in data (digits and bundled photos) and reports PSNR gain and linear-probe accuracy.",
        formatter_class=FieldHelpFormatter,
    )
    add_config_flag(parser)
    parser.add_argument("--version", action="version", version=f"fastebm {__version__}",
                        help="print fastebm's version and exit")
    add_field_flags(parser, TrainConfig, ALIASES)
    for old, name in DEPRECATED.items():
        parser.add_argument(f"--{old}", dest=deprecated_dest(old), default=None, nargs="?", const=True,
                            type=parse_bool, metavar="BOOL", help=f"deprecated alias of --{name}")
    return parser


def deprecated_dest(old: str) -> str:
    """The namespace attribute of deprecated flag ``--old`` (kept apart from the field it stands for)."""
    return f"deprecated_{old}"


def given_on_command_line(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> set:
    """The fields whose flag (or an alias) appears in ``argv``.

    argparse fills a default only for attributes the namespace lacks, so parsing into a namespace
    where every destination already holds a marker leaves the marker exactly on the flags not given.
    """
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not unset}


def warn_deprecated(old: str, where: str, stacklevel: int = 3) -> None:
    """``where``: "--" (a flag) or "config file 'F': key " (a YAML key); ``stacklevel`` as in
    :func:`warnings.warn`, counted from here (3: the caller of this function's caller)."""
    new = f"--{DEPRECATED[old]}" if where == "--" else f"the key {DEPRECATED[old]}"
    warnings.warn(f"{where}{old} is deprecated; use {new} (built-in data only: the PSNR gain and "
                  f"linear probe before and after training; not an evaluate-only mode)", FutureWarning,
                  stacklevel=stacklevel)
