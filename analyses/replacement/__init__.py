"""Replacement level: the residual replacement model (Kim et al., NeurIPS 2025): sae-lens SAEs on the
residual stream of every layer, a faithful replacement forward, attribution graphs and their
faithfulness. The level, its config and result import no torch; the model's classes and
:func:`train_replacement` are imported when first used."""

from importlib import import_module
from typing import Any

from analyses.replacement.compute import Replacement
from analyses.replacement.config import ReplacementConfig
from analyses.replacement.result import ReplacementResult

_LAZY = {"AttributionGraph": "analyses.replacement.graph", "FaithfulnessTable": "analyses.replacement.replacement",
         "ReplacementModel": "analyses.replacement.replacement", "train_replacement": "analyses.replacement.training"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analyses.replacement' has no attribute {name!r}")


__all__ = ["AttributionGraph", "FaithfulnessTable", "Replacement", "ReplacementConfig", "ReplacementModel",
           "ReplacementResult", "train_replacement"]
