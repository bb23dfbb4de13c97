"""Registry of supported models: one JSON file per alias in the ``pretrained_configs`` package.

Each file names the timm architecture (``timm_name`` + ``pretrained_tag``, or ``timm_kwargs`` for a
custom ``VisionTransformer``), an optional shipped ``weights_file``, and the eval preprocessing.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from hooked_vit.errors import InvalidArgumentError, MissingFileError, UnknownNameError


class UnknownModelError(UnknownNameError, ValueError):
    """No registered model has this alias or timm name (a ``ValueError`` too, as before)."""


@dataclass(frozen=True)
class PretrainedSpec:
    """One supported model, as declared in ``pretrained_configs/<alias>.json``."""

    alias: str
    timm_name: str | None
    pretrained_tag: str | None
    timm_kwargs: dict[str, Any]
    preprocessing: dict[str, Any]
    dataset: str | None = None
    weights_file: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hub_name(self) -> str | None:
        """timm model name with its pretrained tag, e.g. ``deit3_base_patch16_224.fb_in1k``."""
        if self.timm_name is None:
            return None
        return f"{self.timm_name}.{self.pretrained_tag}" if self.pretrained_tag else self.timm_name

    @property
    def weights_path(self) -> Path | None:
        """Path of the weights shipped inside the package, if any."""
        if self.weights_file is None:
            return None
        return Path(str(resources.files("pretrained_configs").joinpath(self.weights_file)))


_SPEC_FIELDS = {"alias", "timm_name", "pretrained_tag", "timm_kwargs", "preprocessing", "dataset",
                "weights_file", "description"}


@lru_cache(maxsize=None)
def registry() -> dict[str, PretrainedSpec]:
    """All shipped specs, keyed by alias."""
    specs = {}
    for entry in sorted(resources.files("pretrained_configs").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        spec = PretrainedSpec(
            alias=data["alias"],
            timm_name=data.get("timm_name"),
            pretrained_tag=data.get("pretrained_tag"),
            timm_kwargs=data.get("timm_kwargs", {}),
            preprocessing=data["preprocessing"],
            dataset=data.get("dataset"),
            weights_file=data.get("weights_file"),
            description=data.get("description", ""),
            extra={k: v for k, v in data.items() if k not in _SPEC_FIELDS},
        )
        specs[spec.alias] = spec
    return specs


def get_spec(name: str) -> PretrainedSpec:
    """Resolve an alias (``deit3_base``), a timm name (``deit3_base_patch16_224``) or a timm name
    with tag (``deit3_base_patch16_224.fb_in1k``) to its spec."""
    specs = registry()
    if name in specs:
        return specs[name]
    for spec in specs.values():
        if name in (spec.timm_name, spec.hub_name):
            return spec
    known = sorted(specs)
    close = difflib.get_close_matches(name, known + [s.hub_name for s in specs.values() if s.hub_name], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {name!r}.{hint} Known aliases: {', '.join(known)}. "
        "A directory saved with save_pretrained() or a timm model via HookedViT.from_timm() also work."
    )


ALIAS_PREFIX = "alias:"


def resolve_model_name(name: str | os.PathLike) -> tuple[Path | None, str | None]:
    """``(directory, None)`` for a saved model directory, ``(None, alias)`` for a registered model.

    ``"alias:NAME"`` is always the alias; a ``Path`` or a name with a path separator (``./NAME``,
    ``runs/NAME``, ``~/NAME``) is always a directory (which must exist); a bare name is the alias
    when one is known, warning if a same-named directory exists (pass ``./NAME`` to load that), else
    an existing directory, else :class:`~hooked_vit.errors.UnknownModelError`."""
    if isinstance(name, os.PathLike):
        return _existing_directory(Path(name)), None
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"model name must be a non-empty alias, timm name or directory; got {name!r}")
    if name.startswith(ALIAS_PREFIX):
        alias = name[len(ALIAS_PREFIX):]
        get_spec(alias)
        return None, alias
    if os.sep in name or (os.altsep and os.altsep in name) or name.startswith(("~", ".")):
        return _existing_directory(Path(name).expanduser()), None
    try:
        get_spec(name)
    except UnknownModelError:
        if Path(name).is_dir():
            return Path(name), None
        raise
    if Path(name).is_dir():
        warnings.warn(f"{name!r} is both a model alias and a directory in {Path.cwd()}; loading the alias. "
                      f"Pass './{name}' to load the directory, or 'alias:{name}' to silence this warning",
                      UserWarning, stacklevel=3)
    return None, name


def _existing_directory(path: Path) -> Path:
    if not path.is_dir():
        raise MissingFileError(f"model directory {path} does not exist (expected a directory written by "
                               "HookedViT.save_pretrained; for a registered model pass its alias, e.g. 'alias:NAME')")
    return path
