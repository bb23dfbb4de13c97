"""The one interface analyses consume: labelled images, already transformed for a model.

A :class:`LabelledImages` is a view (a list of positions) onto an :class:`ImageStore` (images in
memory, or files decoded on access). Item ``i`` is ``(image, label)`` with ``image`` a float
tensor ``[channel, height, width]`` ready for the model and ``label`` an ``int`` indexing
``class_names`` (the model's output classes). Subsets are views too and keep the original label
space, so a 100-class subset of ImageNet is still scored against the model's 1000 logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from hooked_vit.data.progress import progress
from hooked_vit.data.subsets import named_subset


class CorruptImageError(ValueError):
    """An image file could not be decoded (truncated, not an image, unsupported format)."""


class ImageStore(ABC):
    """Random access to ``len(store)`` model-ready images, by index."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Float[Tensor, "channel height width"]:
        """Image ``index``, transformed for the model."""


class TensorImages(ImageStore):
    """Images held in memory as one tensor ``[n, channel, height, width]``."""

    def __init__(self, images: Float[Tensor, "n channel height width"]):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, index: int) -> Float[Tensor, "channel height width"]:
        return self.images[index]


class FileImages(ImageStore):
    """Image files decoded with PIL on access (converted to RGB) and passed through ``transform``
    (PIL image -> float tensor ``[channel, height, width]``, e.g. timm's eval transform)."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Float[Tensor, "channel height width"]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise CorruptImageError(
                f"Cannot decode image {str(path)!r} ({type(error).__name__}: {error}). Every file in a class "
                "folder must be a readable image (JPEG, PNG, ...): re-download or delete this file."
            ) from error
        out = self.transform(rgb)
        if not isinstance(out, Tensor) or out.ndim != 3 or not out.is_floating_point():
            raise TypeError(
                f"transform must map a PIL image to a float tensor [channel, height, width], got "
                f"{type(out).__name__}{list(out.shape) if isinstance(out, Tensor) else ''}; end it with "
                "ToTensor()/Normalize() (timm's create_transform does)"
            )
        return out


class LabelledImages(Dataset):
    """Labelled model-ready images: ``dataset[i] -> (image [channel, height, width], label)``.

    Attributes: ``labels`` (``Int[Tensor, "n"]``, one per item), ``class_names`` (readable names of
    the model's classes; ``label`` indexes them), ``class_ids`` (stable ids: ImageNet wnids, or
    ``"0"``..``"9"`` for digits), ``name`` and ``split``.
    """

    def __init__(
        self,
        store: ImageStore,
        store_indices: Int[Tensor, "n"],
        labels: Int[Tensor, "n"],
        class_names: Sequence[str],
        class_ids: Sequence[str],
        *,
        name: str,
        split: str,
    ):
        if len(class_names) != len(class_ids):
            raise ValueError(f"{len(class_names)} class names but {len(class_ids)} class ids")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < len(class_names)):
            raise ValueError(f"labels must lie in [0, {len(class_names)}), "
                             f"got [{int(labels.min())}, {int(labels.max())}]")
        self.store = store
        self.store_indices = store_indices.long()
        self.labels = labels.long()
        self.class_names = list(class_names)
        self.class_ids = list(class_ids)
        self.name = name
        self.split = split

    @classmethod
    def from_tensors(
        cls,
        images: Float[Tensor, "n channel height width"],
        labels: Int[Tensor, "n"],
        class_names: Sequence[str],
        *,
        name: str = "tensors",
        split: str = "all",
    ) -> LabelledImages:
        """Wrap model-ready images and their labels (class ids are the class names)."""
        return cls(TensorImages(images), torch.arange(images.shape[0]), labels, class_names, class_names,
                   name=name, split=split)

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, position: int) -> tuple[Float[Tensor, "channel height width"], int]:
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} out of range for {len(self)} images")
        return self.store.load(int(self.store_indices[position])), int(self.labels[position])

    def __repr__(self) -> str:
        return (f"LabelledImages(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes present={len(self.present_classes())}/{self.num_classes})")

    # ------------------------------------------------------------------ classes
    @property
    def num_classes(self) -> int:
        """Number of classes of the label space (the model's outputs), present or not."""
        return len(self.class_names)

    def present_classes(self) -> list[int]:
        """Sorted class indices that have at least one image in this view."""
        return torch.unique(self.labels).tolist()

    def class_counts(self) -> Int[Tensor, "n_classes"]:
        """Number of images of each class (``[num_classes]``, zeros for absent classes)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def class_index(self, cls: int | str) -> int:
        """Class index of ``cls``: an index, a class id (wnid, ``"3"``) or an exact class name."""
        if isinstance(cls, int):
            if not 0 <= cls < self.num_classes:
                raise ValueError(f"class index {cls} out of range [0, {self.num_classes}) for {self.name!r}")
            return cls
        if cls in self.class_ids:
            return self.class_ids.index(cls)
        if cls in self.class_names:
            return self.class_names.index(cls)
        raise ValueError(f"unknown class {cls!r} for dataset {self.name!r}: give an index in "
                         f"[0, {self.num_classes}), a class id such as {self.class_ids[0]!r} or a class name")

    # ------------------------------------------------------------------ views
    def subset(self, positions: Sequence[int] | Int[Tensor, "k"]) -> LabelledImages:
        """The items at ``positions`` (of this view), in that order; labels are unchanged."""
        index = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if index.numel() and not (-len(self) <= int(index.min()) and int(index.max()) < len(self)):
            raise IndexError(f"positions out of range for {len(self)} images")
        return LabelledImages(self.store, self.store_indices[index], self.labels[index], self.class_names,
                              self.class_ids, name=self.name, split=self.split)

    def positions_of(self, classes: str | Sequence[int | str]) -> Int[Tensor, "k"]:
        """Positions (ascending) of the items whose class is in ``classes`` (see :meth:`select_classes`)."""
        if isinstance(classes, str):
            wnids = named_subset(classes)
            missing = [w for w in wnids if w not in self.class_ids]
            if missing:
                raise ValueError(
                    f"subset {classes!r} lists ImageNet wnids ({', '.join(missing[:3])}, ...) that are not classes of "
                    f"dataset {self.name!r} (class ids {', '.join(self.class_ids[:3])}, ...); named subsets need an "
                    "ImageNet-1k label space, e.g. load_dataset('/data/imagenet', subset='impact100')"
                )
            classes = wnids
        wanted = torch.tensor(sorted({self.class_index(c) for c in classes}), dtype=torch.long)
        return torch.nonzero(torch.isin(self.labels, wanted)).reshape(-1)

    def select_classes(self, classes: str | Sequence[int | str]) -> LabelledImages:
        """The images of ``classes``: a named subset (``"impact100"``, see
        :mod:`hooked_vit.data.subsets`) or a list of class indices / ids / names. Labels keep the
        full label space."""
        return self.subset(self.positions_of(classes))

    # ------------------------------------------------------------------ materialise
    def tensors(
        self, *, show_progress: bool = True
    ) -> tuple[Float[Tensor, "n channel height width"], Int[Tensor, "n"]]:
        """All images stacked ``[n, channel, height, width]`` with their labels ``[n]`` (in memory)."""
        if len(self) == 0:
            raise ValueError(f"{self!r} is empty")
        if isinstance(self.store, TensorImages):
            return self.store.images[self.store_indices], self.labels.clone()
        items = (self.store.load(int(i)) for i in self.store_indices)
        images = list(progress(items, total=len(self), desc=f"loading {self.name}/{self.split}", enabled=show_progress))
        return torch.stack(images), self.labels.clone()
