"""Checks on pruning arguments, each failing with what was wrong and what would be right."""

from __future__ import annotations

import math

from hooked_vit.errors import InvalidArgumentError, InvalidTypeError

# magnitude: per layer (Han et al. 2015); magnitude_row: per output row (as Wanda compares)
METHODS: tuple[str, ...] = ("wanda", "magnitude", "magnitude_row")


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` as a float in ``[0, 1)`` (the fraction of each row's weights set to zero);
    ``ValueError``/``TypeError`` otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise InvalidTypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    sparsity = float(sparsity)
    if not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
        hint = " (a percentage? use e.g. 0.7 for 70%)" if 1.0 < sparsity <= 100.0 else ""
        raise InvalidArgumentError(
            f"sparsity must be in [0, 1): the fraction of each row's weights set to zero, e.g. 0.7; "
            f"got {sparsity}{hint}"
        )
    return sparsity


def check_method(method: object) -> str:
    """``method`` lower-cased if it is a known pruning method; ``ValueError`` otherwise."""
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise InvalidArgumentError(f"Unknown pruning method {method!r}; choose one of {', '.join(repr(m) for m in METHODS)}")
    return method.lower()


def check_nm(nm: object) -> tuple[int, int] | None:
    """``nm`` as an ``(N, M)`` tuple (keep N of every M consecutive input weights), or ``None``."""
    if nm is None:
        return None
    if isinstance(nm, str):
        parts = nm.replace(":", ",").split(",")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            nm = tuple(int(p) for p in parts)
    if (not isinstance(nm, (tuple, list)) or len(nm) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in nm)):
        raise InvalidArgumentError(f"nm must be a pair (N, M) of integers such as (2, 4) or '2:4', got {nm!r}")
    n, m = nm
    if not 0 < n < m:
        raise InvalidArgumentError(f"nm=({n}, {m}) must keep 0 < N < M weights of every group of M, e.g. (2, 4)")
    return (n, m)


def check_nm_fits(nm: tuple[int, int], in_features: int, layer: str) -> None:
    """``ValueError`` unless a row of ``in_features`` weights splits into whole groups of M."""
    if in_features % nm[1]:
        raise InvalidArgumentError(
            f"{layer} has {in_features} input features, not a multiple of M={nm[1]}: N:M sparsity "
            f"needs whole groups of M consecutive weights; pick an M dividing {in_features}"
        )
