"""Progress bars that appear only on passes longer than a couple of seconds (and never when
``TQDM_DISABLE`` is set: :mod:`hooked_vit.bars`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from hooked_vit.bars import bars_enabled

T = TypeVar("T")
PROGRESS_DELAY_S = 2.0


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """``iterable`` under a tqdm bar (to stderr) that shows up only after :data:`PROGRESS_DELAY_S`
    seconds, so short passes print nothing."""
    return iter(tqdm(iterable, desc=desc, total=total, delay=PROGRESS_DELAY_S, disable=not bars_enabled(enabled),
                     leave=False, dynamic_ncols=True))
