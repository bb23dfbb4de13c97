"""Registry of supported models: one JSON file per alias in the ``pretrained_configs`` package.

Each file names the timm architecture (``timm_name`` + ``pretrained_tag``, or ``timm_kwargs`` for a
custom ``VisionTransformer``), an optional shipped ``weights_file``, and the eval preprocessing.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any


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
    raise ValueError(
        f"Unknown model {name!r}.{hint} Known aliases: {', '.join(known)}. "
        "A directory saved with save_pretrained() or a timm model via HookedViT.from_timm() also work."
    )
