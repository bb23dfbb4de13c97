"""A small shared base for analysis results: JSON (with the config that made them) and CSV tables.

A result subclass is a dataclass whose first field is ``config`` (itself a dataclass) and whose
other fields are JSON-able (numbers, strings, lists, dicts). :meth:`AnalysisResult.save` writes

* ``<dir>/result.json``: ``{"kind", "config", "data"}``, every field but ``config`` under ``data``;
* ``<dir>/<name>.csv`` for every table of :meth:`AnalysisResult.tables` (``#`` comment lines carry
  the config: read with ``pandas.read_csv(path, comment="#")`` or :func:`read_csv`);

and :meth:`AnalysisResult.load` reads ``result.json`` back into an equal object. The helpers
(:func:`config_to_dict`, :func:`config_from_dict`, :func:`write_json`, :func:`write_csv`,
:func:`read_csv`, :func:`markdown_table`) are usable on their own.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hooked_vit import atomic, reading
from hooked_vit.errors import CorruptFileError, InvalidArgumentError, InvalidTypeError, MissingFileError

RESULT_FILE = "result.json"

R = TypeVar("R", bound="AnalysisResult")
C = TypeVar("C")


# ----------------------------------------------------------------------------- config <-> dict
def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no literal for them
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists, paths strings)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise InvalidTypeError(f"a config must be a dataclass instance, got {type(config).__name__}")
    return _jsonable(config)


def settings_without(config: Any, run_only: Sequence[str]) -> dict[str, Any]:
    """``config`` as a dict without its ``run_only`` fields: what one saved unit of work (a class,
    an image chunk, a circuit) depends on, compared when a run resumes."""
    data = config_to_dict(config)
    for key in run_only:
        data.pop(key)
    return data


def _is_tuple_type(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(arg) for arg in typing.get_args(annotation))
    return False


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild config dataclass ``cls`` from :func:`config_to_dict`'s output: lists go back to
    tuples where the field is typed as a tuple; unknown fields fail, missing ones take defaults."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidArgumentError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if isinstance(value, list) and _is_tuple_type(hints.get(name)):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------- files
def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (a temporary file renamed over ``path``), so an
    interrupted run never leaves a truncated file."""
    return atomic.write_json(path, _jsonable(data))


def read_json(path: str | os.PathLike, what: str = "a result file (JSON)",
              fix: str = "delete it and rerun the analysis (finished parts are kept)") -> Any:
    """The JSON in ``path``; :class:`~hooked_vit.errors.CorruptFileError` naming the path if it is
    empty or not JSON."""
    return reading.read_json(path, what, fix)


def write_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *, comments: Sequence[str] = ()
) -> Path:
    """Write ``rows`` (dicts with the same keys) as CSV, preceded by ``# comment`` lines, atomically."""
    return atomic.write_csv(path, rows, comments=comments)


def _parse_cell(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a :func:`write_csv` file (comment lines skipped, numbers parsed)."""
    with open(path, newline="") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(lines)]


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, float_format: str = ".3f"
) -> str:
    """A GitHub markdown table of ``rows`` (floats formatted with ``float_format``)."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: Any) -> str:
        return format(value, float_format) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- base class
@dataclasses.dataclass
class AnalysisResult:
    """Base of result objects: a dataclass with ``config`` first and JSON-able data fields.

    Subclasses set ``CONFIG_CLASS`` (the config dataclass) and may override :meth:`tables`
    (CSV tables written by :meth:`save`) and :meth:`plot`.
    """

    CONFIG_CLASS: ClassVar[type]
    config: Any

    def data_dict(self) -> dict[str, Any]:
        """Every field but ``config``, JSON-able."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "config"}

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """CSV tables to write on :meth:`save`: file stem -> rows."""
        return {}

    def config_comment(self) -> str:
        """One line describing the config, for CSV/markdown/figure captions."""
        return f"{type(self.config).__name__} " + json.dumps(config_to_dict(self.config), sort_keys=True)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``result.json`` and the CSV tables into ``directory`` (created); returns it."""
        directory = Path(directory)
        write_json(directory / RESULT_FILE, {"kind": type(self).__name__, "config": config_to_dict(self.config),
                                             "data": self.data_dict()})
        for name, rows in self.tables().items():
            write_csv(directory / f"{name}.csv", rows, comments=[self.config_comment()])
        return directory

    @classmethod
    def load(cls: type[R], directory: str | os.PathLike) -> R:
        """The result saved in ``directory`` by :meth:`save`."""
        path = Path(directory) / RESULT_FILE
        if not path.is_file():
            raise MissingFileError(f"{directory} holds no saved result ({RESULT_FILE} is missing)")
        payload = read_json(path)
        if not isinstance(payload, dict) or not {"kind", "config", "data"} <= set(payload):
            raise CorruptFileError(path, f"a saved {cls.__name__} (JSON with kind, config and data)",
                                   "delete it and rerun the analysis (finished parts are kept)")
        if payload.get("kind") != cls.__name__:
            raise InvalidArgumentError(f"{path} holds a {payload.get('kind')!r}, not a {cls.__name__}")
        return cls(config_from_dict(cls.CONFIG_CLASS, payload["config"]), **payload["data"])
