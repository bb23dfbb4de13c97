"""Read the project's files with errors that name the file, what was expected and how to fix it.

Every reader raises :class:`~hooked_vit.errors.MissingFileError` for a missing file and
:class:`~hooked_vit.errors.CorruptFileError` for an empty, truncated or foreign one (instead of
``EOFError``, ``KeyError 101``, ``JSONDecodeError`` or a safetensors header error without a path).
``what`` describes the file ("a sweep result (JSON)"), ``fix`` says what to do ("delete it and rerun").
Torch files are always loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hooked_vit.errors import CorruptFileError, MissingFileError, short_exception


def _existing(path: str | os.PathLike, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (expected {what}){'; ' + fix if fix else ''}")
    if path.stat().st_size == 0:
        raise CorruptFileError(path, what, fix, found="an empty file, e.g. left by a killed process")
    return path


def read_json(path: str | os.PathLike, what: str = "a JSON file", fix: str = "") -> Any:
    """The JSON value in ``path``."""
    path = _existing(path, what, fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(path, what, fix, found=short_exception(error)) from None


def torch_load(path: str | os.PathLike, what: str = "a torch checkpoint", fix: str = "", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``."""
    import torch

    path = _existing(path, what, fix)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except Exception as error:  # the unpicklers raise anything (IndexError, KeyError 101, ...) on a foreign file
        raise CorruptFileError(path, what, fix, found=short_exception(error)) from None


def load_safetensors(path: str | os.PathLike, what: str = "a safetensors file", fix: str = "",
                     device: str = "cpu") -> dict[str, Any]:
    """``safetensors.torch.load_file(path, device)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _existing(path, what, fix)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptFileError(path, what, fix, found=short_exception(error)) from None


def read_resumable_json(path: str | os.PathLike, what: str) -> Any | None:
    """The JSON in a per-unit result file that a resumable job reuses: ``None`` if absent; if
    corrupt (e.g. from a version without atomic writes), moved aside to ``<name>.corrupt-<id>``
    with a warning and ``None``, so the unit is recomputed."""
    import warnings

    from hooked_vit.atomic import move_aside

    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read_json(path, what)
    except CorruptFileError as error:
        aside = move_aside(path, "corrupt")
        warnings.warn(f"{error}; moved it to {aside} and recomputing it", RuntimeWarning, stacklevel=2)
        return None
