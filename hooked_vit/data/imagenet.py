"""ImageNet-style image folders on disk: ``root/<split>/<class>/<image>`` (e.g.
``/data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG``).

When every class folder is an ImageNet-1k wnid, labels are ImageNet-1k class indices (timm's
order, the order of the model's logits) and the label space is all 1000 classes, whichever folders
are present. Otherwise the folder names, sorted, are the classes (torchvision ``ImageFolder``
convention). Files are decoded lazily with PIL and transformed by the model's eval transform.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from timm.data import ImageNetInfo
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from hooked_vit.data.dataset import FileImages, LabelledImages
from hooked_vit.data.transforms import resolve_transform

# timm's generic ImageNet eval preprocessing (224 px, crop 0.875, bicubic, ImageNet mean/std),
# used when neither a model nor a transform is given.
IMAGENET_DEFAULT_PREPROCESSING = {"input_size": [3, 224, 224]}
LAYOUT = "root/<split>/<wnid>/*.JPEG, e.g. /data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG"


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (``n01440764`` is class 0, tench)."""
    return tuple(ImageNetInfo().label_names())


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """Readable names of the 1000 ImageNet-1k classes, in class-index order (WordNet lemmas,
    e.g. ``"tench, Tinca tinca"``)."""
    return tuple(ImageNetInfo().label_descriptions())


def _class_folders(split_dir: Path) -> list[str]:
    folders = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{str(split_dir)!r} has no class folders; expected the layout {LAYOUT}")
    return folders


def load_image_folder(
    root: str | os.PathLike,
    split: str = "val",
    *,
    model: nn.Module | None = None,
    transform: Callable | None = None,
) -> LabelledImages:
    """Images under ``root/split/<class>/`` (extensions: torchvision's ``IMG_EXTENSIONS``,
    any case), transformed for ``model`` (or by ``transform``; default: timm's ImageNet eval
    preprocessing at 224 px). Raises ``FileNotFoundError`` for a missing root or split folder, no
    class folders, or a class folder without images; decoding errors surface on access as
    :class:`~hooked_vit.data.dataset.CorruptImageError` naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} is not a directory; expected the layout {LAYOUT}")
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"{str(root)!r} has no {split!r} folder (it has: {', '.join(present) or 'no folders'}); expected the "
            f"layout {LAYOUT}. Pick an existing split with split=..."
        )
    folders = _class_folders(split_dir)
    wnids = imagenet_wnids()
    if set(folders) <= set(wnids):
        class_ids, class_names, name = list(wnids), list(imagenet_class_names()), "imagenet"
        index = {w: i for i, w in enumerate(wnids)}
        class_to_idx = {w: index[w] for w in folders}
    else:
        class_ids, class_names, name = folders, folders, root.name
        class_to_idx = {f: i for i, f in enumerate(folders)}
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in samples}
    empty = [f for f in folders if class_to_idx[f] not in found]
    if empty:
        raise FileNotFoundError(
            f"class folder(s) {', '.join(repr(str(split_dir / f)) for f in empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''} contain no images ({len(empty)} of {len(folders)} empty). Every "
            f"class folder needs at least one image with extension {', '.join(IMG_EXTENSIONS)}: add images or "
            "remove the folder."
        )
    store = FileImages([Path(path) for path, _ in samples],
                       resolve_transform(model, transform, IMAGENET_DEFAULT_PREPROCESSING))
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return LabelledImages(store, torch.arange(len(samples)), labels, class_names, class_ids, name=name, split=split)
