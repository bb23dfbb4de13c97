"""Deterministic choices of images: train/val splits, class-balanced draws, "class c vs rest"
sets and calibration samples. Every draw takes a ``seed``; equal seeds give equal draws."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Int
from sklearn.model_selection import train_test_split
from torch import Tensor

from hooked_vit.data.dataset import LabelledImages


def stratified_split(
    labels: Int[Tensor, "n"], *, val_fraction: float, seed: int
) -> tuple[Int[Tensor, "n_train"], Int[Tensor, "n_val"]]:
    """Ascending train and val indices into ``labels``: each class is split in proportion
    ``1 - val_fraction : val_fraction`` (scikit-learn's stratified ``train_test_split``)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    train, val = train_test_split(np.arange(labels.shape[0]), test_size=val_fraction,
                                  stratify=labels.numpy(), random_state=seed)
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))


def train_val_split(
    dataset: LabelledImages, *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[LabelledImages, LabelledImages]:
    """Stratified train/val views of ``dataset`` (e.g. of a folder that has a single split)."""
    train, val = stratified_split(dataset.labels, val_fraction=val_fraction, seed=seed)
    return dataset.subset(train), dataset.subset(val)


def balanced_positions(
    labels: Int[Tensor, "n"], classes: Sequence[int], n: int, *, seed: int
) -> Int[Tensor, "k"]:
    """``n`` positions of ``labels`` drawn without replacement, spread evenly over ``classes``.

    Round robin: each class's positions are shuffled, the classes are put in a random order, and
    round ``r`` takes the ``r``-th image of every class that still has one. A class with fewer
    images than its share is used up and the others fill in; any prefix of the result is itself
    balanced.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(classes), generator=generator).tolist()
    pools = []
    for i in order:
        members = torch.nonzero(labels == classes[i]).reshape(-1)
        pools.append(members[torch.randperm(members.numel(), generator=generator)].tolist())
    available = sum(len(pool) for pool in pools)
    if not 0 <= n <= available:
        raise ValueError(f"cannot draw {n} images from {available} images of {len(classes)} classes")
    chosen: list[int] = []
    for r in range(max((len(pool) for pool in pools), default=0)):
        chosen.extend(pool[r] for pool in pools if r < len(pool))
        if len(chosen) >= n:
            break
    return torch.tensor(chosen[:n], dtype=torch.long)


class ClassVsRest(NamedTuple):
    """A balanced binary set: ``dataset`` holds ``n`` images of the target class followed by ``n``
    images of the other classes; ``is_target`` (``[2n]``) marks the former."""

    dataset: LabelledImages
    is_target: Bool[Tensor, "m"]
    target: int


def class_vs_rest(
    dataset: LabelledImages, target: int | str, *, n: int | None = None, seed: int = 0
) -> ClassVsRest:
    """``n`` images of class ``target`` (index, id or name) and ``n`` of the other present classes,
    spread evenly over them (:func:`balanced_positions`). Default ``n``: every image of the target
    class (at most as many as the rest has)."""
    c = dataset.class_index(target)
    own = torch.nonzero(dataset.labels == c).reshape(-1)
    rest_classes = [k for k in dataset.present_classes() if k != c]
    n_rest = int((dataset.labels != c).sum())
    if own.numel() == 0:
        raise ValueError(f"class {target!r} ({dataset.class_names[c]}) has no images in {dataset!r}")
    if not rest_classes:
        raise ValueError(f"{dataset!r} has no images outside class {target!r}")
    n = min(own.numel(), n_rest) if n is None else n
    if not 1 <= n <= min(own.numel(), n_rest):
        raise ValueError(f"n={n} but class {target!r} has {own.numel()} images and the rest {n_rest}; "
                         f"choose 1 <= n <= {min(own.numel(), n_rest)}")
    generator = torch.Generator().manual_seed(seed)
    targets = own[torch.randperm(own.numel(), generator=generator)[:n]].sort().values
    others = balanced_positions(dataset.labels, rest_classes, n, seed=seed + 1)
    is_target = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    return ClassVsRest(dataset.subset(torch.cat([targets, others])), is_target, c)


def calibration_sample(dataset: LabelledImages, n: int, *, seed: int = 0) -> LabelledImages:
    """``n`` images drawn without replacement, balanced over the present classes (round robin, see
    :func:`balanced_positions`), e.g. for Wanda pruning's activation statistics."""
    if n < 1 or n > len(dataset):
        raise ValueError(f"calibration needs 1 <= n <= {len(dataset)} (images in {dataset!r}), got n={n}")
    return dataset.subset(balanced_positions(dataset.labels, dataset.present_classes(), n, seed=seed))
