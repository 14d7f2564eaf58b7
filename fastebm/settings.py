"""Settings as dataclasses, for every command that has them (``fastebm-train``, ``fastebm-eval``).

One field is one flag (same name) and one key of the YAML file given with ``--config``; flags
override the file. The field's annotation gives the flag's converter (:func:`field_type`: ``int``,
``float``, ``str``, ``bool`` through :func:`parse_bool`; ``Optional[...]`` also takes none/null;
``List[...]`` is ``nargs="+"``), its metadata the help text and the choices (:func:`option`). A
YAML file is checked like a command line: every key must name a field (or an alias of one) and
every value is converted and checked by the flag's own converter (:func:`read_config_file`).
Mistakes raise :class:`~fastebm.errors.UsageError` with one line naming the flag or key; so does
argparse through :class:`ArgumentParser`. Imports nothing from fastebm but its errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import types
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .errors import UsageError

__all__ = ["ArgumentParser", "option", "parse_bool", "optional", "field_type", "field_choices", "is_list",
           "add_config_flag", "add_field_flags", "coerce", "read_yaml_mapping", "read_config_file", "to_dict",
           "check_device"]

NONE_WORDS = ("none", "null", "")  # what an Optional flag reads as None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes raise one UsageError line (exit 2) instead of printing the usage and
    exiting; ``--help`` and ``--version`` still print their text and raise SystemExit(0)."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field: its default, its flag's help text and further metadata (``choices``: a
    sequence, or a callable asked when the parser is built, for registries that fill late)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def parse_bool(text: Any) -> bool:
    """1/true/yes/on -> True, 0/false/no/off -> False (any case); ArgumentTypeError otherwise."""
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``conv`` that also reads none/null/empty (and ``None``) as None; keeps ``conv``'s name for
    argparse's messages."""
    def parse(text):
        if text is None or str(text).strip().lower() in NONE_WORDS:
            return None
        return conv(text)

    parse.__name__ = conv.__name__
    return parse


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)  # the annotations evaluated (modules with postponed annotations hold strings)


def _base_type(cls: type, f: dataclasses.Field) -> Tuple[Any, bool]:
    """(annotation without ``Optional``, whether None is allowed) of field ``f`` of ``cls``."""
    hint = _type_hints(cls)[f.name]
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return hint, False


def is_list(cls: type, f: dataclasses.Field) -> bool:
    """Whether the field holds a list (a flag with ``nargs="+"``)."""
    return typing.get_origin(_base_type(cls, f)[0]) is list


def _item_type(cls: type, f: dataclasses.Field) -> Any:
    """The annotation of one value of field ``f``: without ``Optional``, and of a list field its item."""
    base = _base_type(cls, f)[0]
    if typing.get_origin(base) is list:
        (base,) = typing.get_args(base)
    return base


def field_type(cls: type, f: dataclasses.Field) -> Callable[[Any], Any]:
    """The converter of one flag value (of a list field: of one item), from the field's annotation;
    TypeError for an annotation other than int, float, str, bool, their Optional or List."""
    base, can_be_none = _item_type(cls, f), _base_type(cls, f)[1]
    if base not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{f.name}: unsupported annotation {base!r}")
    if base is bool:
        return parse_bool
    return optional(base) if can_be_none else base


def field_choices(f: dataclasses.Field) -> Optional[Sequence[Any]]:
    """The allowed values of a field, or None (a callable in the metadata is asked now)."""
    choices = f.metadata.get("choices")
    return list(choices()) if callable(choices) else choices


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML file whose keys are flag names; command-line flags override it")


def add_field_flags(parser: argparse.ArgumentParser, cls: type,
                    aliases: Mapping[str, str] = types.MappingProxyType({})) -> None:
    """One flag ``--NAME`` per field of dataclass ``cls`` (destination NAME), plus ``--ALIAS`` for
    every ``aliases`` entry ``ALIAS -> NAME``; defaults are the fields' defaults. A bool flag alone
    means true (``--flag``, ``--flag false``)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: Dict[str, Any] = dict(default=default, help=f.metadata["help"])
        if is_list(cls, f):
            kw.update(nargs="+", type=field_type(cls, f))
        elif _base_type(cls, f)[0] is bool:
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        else:
            kw["type"] = field_type(cls, f)
        choices = field_choices(f)
        if choices is not None:
            kw["choices"] = choices
        names = [f"--{f.name}"] + [f"--{a}" for a, name in aliases.items() if name == f.name]
        parser.add_argument(*names, dest=f.name, **kw)


def _value_hint(cls: type, f: dataclasses.Field) -> str:
    """What a value of field ``f`` looks like, for an error message."""
    choices = field_choices(f)
    if choices:
        return f"one of {list(choices)}"
    base = _base_type(cls, f)[0]
    if base is bool:
        return "true or false"
    return "one or more values" if is_list(cls, f) else "a value"


def _whole_number(value: Any, where: str) -> Any:
    """A YAML or Python value of an int setting: an integral float (``4.0``) becomes the int, a bool or a
    non-integral number is a UsageError ``"WHERE: 3.5 is not a whole number; ..."``. A string of a
    float (PyYAML reads ``1e3`` as the string '1e3') is a UsageError too: ``"WHERE: '1e3' is 1000
    written as a float; write 1000"``, or the whole-number error when it is not integral. Anything
    else is returned for the converter (``int("3")``)."""
    if isinstance(value, str):
        try:
            int(value)
            return value
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            return value  # not a number at all: the converter's "invalid value"
        if number != number or number in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: {value!r} is not a whole number; give an integer")
        if not number.is_integer():
            lo = math.floor(number)
            raise UsageError(f"{where}: {value!r} is not a whole number; give an integer such as {lo} or {lo + 1}")
        raise UsageError(f"{where}: {value!r} is {int(number)} written as a float; write {int(number)}")
    if isinstance(value, bool):
        raise UsageError(f"{where}: {str(value).lower()} is not a whole number; give an integer such as 1 or 2 "
                         f"(true/false suits only on/off settings)")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: {value} is not a whole number; give an integer")
        if not value.is_integer():
            lo = math.floor(value)
            raise UsageError(f"{where}: {value!r} is not a whole number; give an integer such as {lo} or {lo + 1}")
        return int(value)
    return value


def coerce(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    """A YAML or Python value of field ``f`` converted and checked as its flag would be (a single
    value for a list field becomes a one-item list); UsageError ``"WHERE: ..."`` otherwise.

    An int setting takes ints, integral floats (``4.0`` -> 4) and strings of ints; a bool, a
    non-integral number (``3.5``), a non-finite one or a string of a float (YAML ``1e3``) is an
    error, never truncated."""
    listed = is_list(cls, f)
    if (value is None and (listed or not _base_type(cls, f)[1])) or (
            listed and isinstance(value, (list, tuple)) and any(v is None for v in value)):
        raise UsageError(f"{where}: {'has no value' if value is None else 'an item has no value'}; give "
                         f"{_value_hint(cls, f)} or leave the setting out (null / None suits only settings whose "
                         f"default is none)")
    if _item_type(cls, f) is int:  # checked before int() truncates
        value = ([_whole_number(v, where) for v in value] if isinstance(value, (list, tuple))
                 else _whole_number(value, where) if value is not None else None)
    try:
        if listed:
            item = field_type(cls, f)
            value = [item(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif value is not None:  # None here: an Optional field left unset
            value = field_type(cls, f)(value if not isinstance(value, bool) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UsageError(f"{where}: invalid value {value!r}") from None
    choices = field_choices(f)
    if value is not None and choices is not None and value not in choices:
        raise UsageError(f"{where}: {value!r} is not one of {list(choices)}")
    return value


class _DuplicateKey(Exception):
    """A key given twice in one YAML mapping: (key, line of the first, line of the second)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may repeat keys on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str) -> Dict[Any, Any]:
    """The mapping a YAML file holds (empty file: ``{}``); UsageError naming ``path`` when it is
    missing, not valid YAML (with the parser's first line), gives a key twice (naming both lines)
    or is not a mapping."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    try:
        with open(path) as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as dup:
        key, first, second = dup.args
        raise UsageError(f"config file {path!r} gives {key} twice (lines {first} and {second}); keep one") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must be a mapping of flag names to values")
    return data


def read_config_file(path: str, cls: type, aliases: Mapping[str, str] = types.MappingProxyType({}),
                     on_alias: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """``{field name: value}`` of a ``--config`` YAML file for dataclass ``cls``, each value
    converted and checked like its flag (:func:`coerce`). Keys are flag names (``-`` or ``_``) or
    ``aliases`` (other spelling -> field name; ``on_alias(key)`` is called for each one used).
    UsageError for a bad file, an unknown key, a key or field given twice, a bad value (e.g. a
    non-integral number for an int setting) or choice."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: Dict[str, Any] = {}
    spelled: Dict[str, str] = {}
    for written, value in read_yaml_mapping(path).items():
        written = str(written)
        key = written.replace("-", "_")
        name = aliases.get(key, key)
        if name not in fields:
            raise UsageError(f"config file {path!r} has unknown key {written!r}; keys are flag names such as "
                             f"batch_size")
        if name in out:  # named as written: "as batch_size and batch-size"
            raise UsageError(f"config file {path!r} gives {name} twice (as {spelled[name]} and {written}); keep one")
        if key in aliases and on_alias is not None:
            on_alias(key)
        out[name], spelled[name] = coerce(cls, fields[name], value, f"config key {key}"), written
    return out


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A settings dataclass as a plain dict (tuples and lists as new lists) for checkpoints, JSON and YAML."""
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), (list, tuple)) else v)
            for f in dataclasses.fields(cfg)}


def check_device(value: str) -> str:
    """A ``--device`` value lower-cased and stripped: auto, cpu, cuda or cuda:N; UsageError otherwise."""
    dev = value.strip().lower()
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {value!r})")
    return dev


SEED_LIMIT = 2 ** 32  # every command's --seed: numpy and scikit-learn take seeds below 2**32


def check_seed(seed: Any) -> int:
    """``--seed`` as an int in [0, 2**32); raises UsageError naming the flag otherwise."""
    from .errors import UsageError

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed must be a whole number in [0, 2**32), got {seed!r}")
    return seed


class FieldHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help with ``(default: X)`` after each flag that has a default; none after a flag whose default is
    ``None``, whose help says what leaving it unset means ("none = ...") instead of printing ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        if isinstance(action.default, (list, tuple)) and "%(default)" not in (action.help or ""):
            # a list default as the command line would spell it, not as a Python tuple
            return f"{action.help or ''} (default: {' '.join(str(v) for v in action.default)})"
        return super()._get_help_string(action)


class DefaultsHelpFormatter(FieldHelpFormatter):
    """:class:`FieldHelpFormatter`, except that a flag whose help already names its default gets no ``(default: X)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)
