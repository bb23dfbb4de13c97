"""Which classes a level analyses (shared by every level that works class by class)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hooked_vit.errors import InvalidArgumentError


def resolve_classes(dataset: Any, classes: Sequence[int | str] | None) -> list[int]:
    """Class indices to analyse: ``classes`` (indices, ids or names; each needs images in
    ``dataset``, a :class:`~hooked_vit.data.LabelledImages`), default every class present."""
    if len(dataset) == 0:
        raise InvalidArgumentError(f"{dataset!r} has no images to analyse")
    if classes is None:
        return dataset.present_classes()
    present = set(dataset.present_classes())
    out = []
    for c in classes:
        index = dataset.class_index(c)
        if index not in present:
            raise InvalidArgumentError(f"class {c!r} ({dataset.class_names[index]}) has no images in {dataset!r}; "
                                       f"classes with images: {sorted(present)}")
        out.append(index)
    if not out:
        raise InvalidArgumentError("classes must name at least one class")
    return list(dict.fromkeys(out))
