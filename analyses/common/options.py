"""Command-line options made from a config dataclass (standard library only).

Each field becomes ``--field-name`` (a nested config dataclass's fields ``--field.sub-name``) with
its type, its ``help`` and ``choices`` from the field's metadata (:func:`analyses.common.family.setting`)
and its default shown; a tuple field takes ``a,b,c``; a boolean field ``--name`` / ``--no-name``; an
optional field also takes ``none``. Only the options given are passed on, so the config's own
defaults (and a preset's) stay in force.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

NONE_WORDS = ("none", "None", "default")


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _parse_scalar(text: str, kinds: tuple[Any, ...]) -> Any:
    """``text`` as the first of ``kinds`` (int, float, str, bool) it parses as."""
    for kind in kinds:
        if kind is bool:
            if text.lower() in ("true", "yes", "1"):
                return True
            if text.lower() in ("false", "no", "0"):
                return False
        elif kind is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif kind is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif kind is str:
            return text
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise argparse.ArgumentTypeError(f"expected {names}, got {text!r}")


def _converter(annotation: Any, choices: tuple[Any, ...] | None) -> tuple[Any, str]:
    """A function parsing one option's text into the field's value, and the metavar it shows."""
    alternatives = _alternatives(annotation)
    optional = type(None) in alternatives
    alternatives = tuple(a for a in alternatives if a is not type(None))
    sequence = [a for a in alternatives if typing.get_origin(a) is tuple]
    if sequence:
        items = tuple(k for a in typing.get_args(sequence[0]) if a is not Ellipsis for k in _alternatives(a))
        scalar = items
    else:
        scalar = tuple(a for a in alternatives if a in (bool, int, float, str)) or (str,)

    def check(value: Any) -> Any:
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    def convert(text: str) -> Any:
        if optional and text in NONE_WORDS:
            return None
        if sequence:
            parts = [part.strip() for part in text.split(",")]
            if not text.strip() or any(not part for part in parts):
                raise argparse.ArgumentTypeError(f"expected a comma-separated list (a,b,c), got {text!r}")
            return tuple(check(_parse_scalar(part, scalar)) for part in parts)
        return check(_parse_scalar(text, scalar))

    metavar = "A,B,..." if sequence else ({int: "N", float: "X"}.get(scalar[0], "TEXT") if not choices
                                          else "{" + ",".join(map(str, choices)) + "}")
    return convert, metavar


def _help(field: dataclasses.Field, default: Any) -> str:
    text = field.metadata.get("help", "")
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    if dataclasses.is_dataclass(default) or default is dataclasses.MISSING or default is None or "default" in text:
        return text.replace("%", "%%")
    return f"{text} (default: {shown})".replace("%", "%%")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def add_config_options(parser: argparse._ActionsContainer, cls: type, *, prefix: str = "",
                       skip: tuple[str, ...] = ()) -> None:
    """One option per field of config dataclass ``cls`` (nested config dataclasses recursively,
    with ``prefix.``); fields in ``skip`` are left out."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} settings") if not prefix else parser
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        default = _default(field)
        nested = [a for a in _alternatives(hints[field.name]) if dataclasses.is_dataclass(a)]
        if nested:
            add_config_options(group, nested[0], prefix=f"{prefix}{field.name}.")
            continue
        option = f"--{prefix}{field.name.replace('_', '-')}"
        dest = f"{prefix}{field.name}"
        if hints[field.name] is bool:
            group.add_argument(option, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=_help(field, default))
            continue
        convert, metavar = _converter(hints[field.name], field.metadata.get("choices"))
        group.add_argument(option, dest=dest, type=convert, default=argparse.SUPPRESS,
                           metavar=field.metadata.get("metavar") or metavar, help=_help(field, default))


def given_options(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` given as options in ``args``, nested configs as nested dicts (ready for
    :func:`analyses.common.results.config_from_dict` or a study's level settings)."""
    hints = typing.get_type_hints(cls)
    given: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        nested = [a for a in _alternatives(hints[field.name]) if dataclasses.is_dataclass(a)]
        if nested:
            inner = given_options(args, nested[0], prefix=f"{prefix}{field.name}.")
            if inner:
                given[field.name] = inner
        elif hasattr(args, f"{prefix}{field.name}"):
            given[field.name] = getattr(args, f"{prefix}{field.name}")
    return given


__all__ = ["add_config_options", "given_options"]
