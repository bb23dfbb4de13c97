"""Transcoders level (issue 23): cross-layer transcoders (CLTs) in place of a ViT's MLPs, per-layer
baselines, replacement accuracy and each layer's contribution to the final representation.

``CrossLayerTranscoder`` and ``train_clt`` import torch, so they load on first use: the level's
``--help`` imports this package without torch."""

from typing import Any

from analyses.transcoders.compute import Transcoders
from analyses.transcoders.config import CLTConfig
from analyses.transcoders.result import CLTResult

_LAZY = {"CrossLayerTranscoder": "analyses.transcoders.clt", "train_clt": "analyses.transcoders.training"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLTConfig", "CLTResult", "CrossLayerTranscoder", "Transcoders", "train_clt"]
