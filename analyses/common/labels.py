"""How a model variant is named in tables and figures (one rule for every level)."""

from __future__ import annotations

RANDOM_LABEL = "random weights"


def sparsity_label(sparsity: float) -> str:
    """``"dense"`` at 0, else the sparsity as ``"0.3"``."""
    return "dense" if float(sparsity) == 0 else f"{float(sparsity):g}"


def model_label(sparsity: float, method: str, random: bool = False) -> str:
    """``"dense"``, ``"wanda 0.3"`` or ``"random weights"``."""
    if random:
        return RANDOM_LABEL
    return "dense" if float(sparsity) == 0.0 else f"{method} {float(sparsity):g}"
