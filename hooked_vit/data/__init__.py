"""Labelled image datasets for analyses: one interface (:class:`LabelledImages`), two sources.

* ``load_dataset("digits", split="val", model=model)``: the builtin dataset, scikit-learn's
  handwritten digits (no download; see :mod:`hooked_vit.data.digits`).
* ``load_dataset("/data/imagenet", split="val", model=model)``: an ImageNet-style folder
  ``root/<split>/<wnid>/*.JPEG`` (see :mod:`hooked_vit.data.imagenet`).

Images come out transformed by the model's own timm eval transform. Views and draws:
:meth:`LabelledImages.select_classes` (e.g. ``subset="impact100"``, 100 ImageNet classes in 13
groups), :func:`train_val_split`, :func:`class_vs_rest`, :func:`calibration_sample`;
:func:`make_loader` gives a DataLoader sized for CPU or GPU.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence

from torch import nn

from hooked_vit.data.dataset import CorruptImageError, FileImages, ImageStore, LabelledImages, TensorImages
from hooked_vit.data.digits import DIGITS_PREPROCESSING, load_digits_dataset
from hooked_vit.data.imagenet import imagenet_class_names, imagenet_wnids, load_image_folder
from hooked_vit.data.loaders import default_batch_size, default_num_workers, make_loader, resolve_device
from hooked_vit.data.progress import progress
from hooked_vit.data.sampling import (
    ClassVsRest,
    balanced_positions,
    calibration_sample,
    class_vs_rest,
    stratified_split,
    train_val_split,
)
from hooked_vit.data.subsets import IMPACT100, IMPACT100_GROUPS, NAMED_SUBSETS, named_subset, subset_groups

# Datasets that ship inside an installed package: name -> loader(split, *, model, transform).
BUILTIN_DATASETS: dict[str, Callable[..., LabelledImages]] = {"digits": load_digits_dataset}
DEFAULT_BUILTIN = "digits"


def _builtin_name(model: nn.Module | None) -> str:
    """The dataset ``"builtin"`` stands for: the model's own builtin dataset (default digits)."""
    if model is None:
        return DEFAULT_BUILTIN
    name = getattr(getattr(model, "cfg", None), "dataset", None) or DEFAULT_BUILTIN
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"'builtin' means the model's builtin dataset, but this model was trained on {name!r}, "
                         f"which is not builtin ({', '.join(BUILTIN_DATASETS)}); pass the path of its image folder")
    return name


def load_dataset(
    source: str | os.PathLike,
    split: str = "val",
    *,
    model: nn.Module | None = None,
    transform: Callable | None = None,
    subset: str | Sequence[int | str] | None = None,
) -> LabelledImages:
    """Labelled images of ``split`` from ``source``, transformed for ``model``.

    ``source``: a builtin dataset name (``"digits"``; ``"builtin"`` = the model's builtin dataset)
    or the root of an ImageNet-style folder (``root/<split>/<wnid>/*.JPEG``). Images go through
    ``model``'s eval transform (``model.transform()``), or ``transform`` (PIL image -> float tensor
    ``[channel, height, width]``), or the source's default preprocessing. ``subset``: a named subset
    (``"impact100"``) or class indices / ids / names to keep (labels keep the full label space).
    """
    name = str(source)
    if name == "builtin":
        name = _builtin_name(model)
    if name in BUILTIN_DATASETS:
        dataset = BUILTIN_DATASETS[name](split, model=model, transform=transform)
    elif os.path.isdir(name):
        dataset = load_image_folder(name, split, model=model, transform=transform)
    else:
        close = difflib.get_close_matches(name, list(BUILTIN_DATASETS) + ["builtin"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(
            f"unknown dataset source {name!r}: neither a builtin dataset ({', '.join(BUILTIN_DATASETS)}, or 'builtin' "
            f"for the model's own) nor an existing directory.{hint} A folder source must be laid out as "
            "root/<split>/<wnid>/*.JPEG, e.g. load_dataset('/data/imagenet', split='val', model=model)."
        )
    return dataset if subset is None else dataset.select_classes(subset)


__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_BUILTIN",
    "DIGITS_PREPROCESSING",
    "IMPACT100",
    "IMPACT100_GROUPS",
    "NAMED_SUBSETS",
    "ClassVsRest",
    "CorruptImageError",
    "FileImages",
    "ImageStore",
    "LabelledImages",
    "TensorImages",
    "balanced_positions",
    "calibration_sample",
    "class_vs_rest",
    "default_batch_size",
    "default_num_workers",
    "imagenet_class_names",
    "imagenet_wnids",
    "load_dataset",
    "load_digits_dataset",
    "load_image_folder",
    "make_loader",
    "named_subset",
    "progress",
    "resolve_device",
    "stratified_split",
    "subset_groups",
    "train_val_split",
]
