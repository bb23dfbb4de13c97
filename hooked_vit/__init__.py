"""hooked-vit: TransformerLens-style hooks on timm Vision Transformers (DeiT-III).

The names below are imported on first use (PEP 562), so ``import hooked_vit.cli`` (the
``hooked-vit`` command) and ``hooked_vit.errors`` stay light: torch loads only when a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "HookedViT": "hooked_vit.model",
    "HookedViTConfig": "hooked_vit.config",
    "ViTActivationCache": "hooked_vit.cache",
    "SITE_NAMES": "hooked_vit.sites",
    "Site": "hooked_vit.sites",
    "SiteRegistry": "hooked_vit.sites",
}

__all__ = ["HookedViT", "HookedViTConfig", "ViTActivationCache", "SITE_NAMES", "Site", "SiteRegistry"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from hooked_vit.cache import ViTActivationCache
    from hooked_vit.config import HookedViTConfig
    from hooked_vit.model import HookedViT
    from hooked_vit.sites import SITE_NAMES, Site, SiteRegistry


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hooked_vit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
