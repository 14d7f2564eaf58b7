"""The command line of ``fastebm-train``: one flag per :class:`~.fields.TrainConfig` field.

A flag's type, ``nargs`` and choices come from the field's annotation and metadata, so a new field
is a new flag with nothing else to write. MAE's names are accepted where they mean the same
(:data:`ALIASES`: ``--input_size``, ``--data_path``), on the command line and in the config file;
``--eval`` is a deprecated alias of ``--demo_eval`` (:data:`DEPRECATED`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ... import __version__
from ...errors import UsageError
from .fields import TrainConfig

# Other tools' flag names with the same meaning (MAE's main_pretrain.py): alias -> field.
ALIASES = {"input_size": "img_size", "data_path": "data"}
# Old names that still work but warn: old -> field.
DEPRECATED = {"eval": "demo_eval"}


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(conv):
    def parse(text):
        if text is None or str(text).strip().lower() in ("none", "null", ""):
            return None
        return conv(text)

    parse.__name__ = conv.__name__
    return parse


@functools.lru_cache(maxsize=None)
def _type_hints() -> Dict[str, Any]:
    return typing.get_type_hints(TrainConfig)  # the annotations evaluated (they are strings there)


def _base_type(f: dataclasses.Field):
    """(type without ``Optional``, whether None is allowed) of a field, from its annotation."""
    hint = _type_hints()[f.name]
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return hint, False


def is_list(f: dataclasses.Field) -> bool:
    """Whether the field holds a list (a flag with ``nargs="+"``)."""
    return typing.get_origin(_base_type(f)[0]) is list


def field_type(f: dataclasses.Field) -> Callable[[Any], Any]:
    """The converter of one flag value (a list field: of one item), derived from the field's annotation."""
    base, optional = _base_type(f)
    if typing.get_origin(base) is list:
        (base,) = typing.get_args(base)
    if base not in (int, float, str, bool):
        raise TypeError(f"TrainConfig.{f.name}: unsupported annotation {base!r}")
    if base is bool:
        return _parse_bool
    return _optional(base) if optional else base


def field_choices(f: dataclasses.Field) -> Optional[Sequence[str]]:
    """The allowed values of a field (a callable in the metadata is asked now: registries fill late)."""
    choices = f.metadata.get("choices")
    return list(choices()) if callable(choices) else choices


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag becomes one UsageError line instead of usage text + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every flag (defaults: the fields' defaults; ``--config FILE`` sets others first)."""
    parser = _Parser(
        prog="fastebm-train",
        description="Energy-inspired self-supervised pretraining of a ViT. With no arguments it pretrains "
        "vit_demo on built-in data (digits and bundled photos) and reports PSNR gain and linear-probe accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file whose keys are flag names; command-line flags override it")
    parser.add_argument("--version", action="version", version=f"fastebm {__version__}",
                        help="print fastebm's version and exit")
    for f in dataclasses.fields(TrainConfig):
        kw = dict(default=f.default if f.default is not dataclasses.MISSING else f.default_factory(), help=f.metadata["help"])
        if is_list(f):
            kw.update(nargs="+", type=field_type(f))
        elif _base_type(f)[0] is bool:
            kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kw["type"] = field_type(f)
        if field_choices(f) is not None:
            kw["choices"] = field_choices(f)
        aliases = [f"--{a}" for a, name in ALIASES.items() if name == f.name]
        parser.add_argument(f"--{f.name}", *aliases, dest=f.name, **kw)
    for old, name in DEPRECATED.items():
        parser.add_argument(f"--{old}", dest=deprecated_dest(old), default=None, nargs="?", const=True,
                            type=_parse_bool, metavar="BOOL", help=f"deprecated alias of --{name}")
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
    prefix = "--" if where == "--" else where
    warnings.warn(f"{prefix}{old} is deprecated; use {prefix}{DEPRECATED[old]} (built-in data only: the PSNR gain and "
                  f"linear probe before and after training; not an evaluate-only mode)", FutureWarning,
                  stacklevel=stacklevel)
