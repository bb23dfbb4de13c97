"""Units of work: the per-unit result files every level resumes from, and the share of the units one
process takes when a study is spread over several (``torchrun``).

A unit (one class of one model, one image chunk, one SAE) is saved as ``{"settings", "record"}``
the moment it is done, atomically; a rerun reuses it when its settings are equal and recomputes it
otherwise (a corrupt file is moved aside with a warning).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from analyses.common.results import write_json
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.reading import read_resumable_json

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world``: takes every ``world``-th unit of a study's global unit order."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.world, int) and self.world >= 1 and isinstance(self.rank, int)
                and 0 <= self.rank < self.world):
            raise InvalidArgumentError(f"a shard needs 0 <= rank < world, got rank {self.rank!r} of {self.world!r}")

    @property
    def whole(self) -> bool:
        """Whether this process does every unit (a single-process run)."""
        return self.world == 1

    def take(self, units: Sequence[T], offset: int = 0) -> list[T]:
        """This process's units of ``units``, whose first has global position ``offset``."""
        return [unit for i, unit in enumerate(units) if (offset + i) % self.world == self.rank]


def load_unit(path: str | os.PathLike, settings: dict[str, Any], what: str) -> Any | None:
    """The record saved in ``path`` if it was made with ``settings``, else ``None`` (recompute)."""
    saved = read_unit(path, what)
    return saved["record"] if saved is not None and saved["settings"] == settings else None


def read_unit(path: str | os.PathLike, what: str) -> dict[str, Any] | None:
    """The saved unit in ``path`` (``{"settings", "record", "seconds"}``), or ``None`` if there is none."""
    saved = read_resumable_json(path, what)
    return saved if isinstance(saved, dict) and "record" in saved and "settings" in saved else None


def save_unit(path: str | os.PathLike, settings: dict[str, Any], record: Any, *, seconds: float = 0.0) -> None:
    """Save one finished unit (whole or not at all), with the seconds it took."""
    write_json(path, {"settings": settings, "record": record, "seconds": seconds})
