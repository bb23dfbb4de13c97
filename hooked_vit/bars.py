"""The process-wide progress-bar switch: ``TQDM_DISABLE=1`` in the environment turns every bar off,
ours and the libraries' (sae-lens's). ``hooked-vit ... --no-progress`` sets it before any bar
library loads. tqdm reads it only once, as a default that an explicit ``disable=False`` overrides,
so our bars ask :func:`bars_enabled`. Standard library only: the command line imports it."""

from __future__ import annotations

import os

SWITCH = "TQDM_DISABLE"


def bars_enabled(requested: bool = True) -> bool:
    """``requested``, unless ``TQDM_DISABLE`` is set to a true value in the environment."""
    return requested and os.environ.get(SWITCH, "").strip().lower() not in ("1", "true", "yes")


def disable_bars() -> None:
    """Every progress bar off in this process and its children; a library imported before this call
    keeps tqdm's default for its bars, so call it first."""
    os.environ[SWITCH] = "1"


__all__ = ["bars_enabled", "disable_bars"]
