"""Builtin dataset: scikit-learn's handwritten digits (1,797 real 8x8 greyscale scans, 10 classes).

It ships inside scikit-learn, so it needs no download. Each image (16 grey levels) becomes an 8-bit
greyscale PIL image, replicated to RGB, and goes through the model's eval transform (for the
embedded model: bilinear resize to 32x32 and normalisation with the train pixels' mean/std).
The split is fixed: a stratified 80/20 train/val split with seed 0 (1,437 / 360 images).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from jaxtyping import Int, UInt8
from PIL import Image
from sklearn.datasets import load_digits
from torch import Tensor, nn

from hooked_vit.data.dataset import LabelledImages, TensorImages
from hooked_vit.data.sampling import stratified_split
from hooked_vit.data.transforms import resolve_transform

DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLITS = ("train", "val", "all")
DIGITS_CLASS_NAMES = tuple(str(d) for d in range(10))
# Mean and std of the train split's pixels in [0, 1] (tests recompute them), same for R, G, B.
DIGITS_MEAN = 0.3054
DIGITS_STD = 0.376
DIGITS_PREPROCESSING = {
    "input_size": [3, 32, 32],
    "mean": [DIGITS_MEAN] * 3,
    "std": [DIGITS_STD] * 3,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[UInt8[np.ndarray, "n 8 8"], Int[np.ndarray, "n"]]:
    """All 1,797 digits as uint8 images ``[n, 8, 8]`` (0..255) and their labels ``[n]`` (0..9)."""
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def digits_split_indices(split: str) -> Int[Tensor, "n"]:
    """Ascending indices into :func:`digits_arrays` of ``split`` (``"train"``, ``"val"`` or ``"all"``)."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"digits has splits {', '.join(DIGITS_SPLITS)}; got split={split!r}")
    labels = torch.from_numpy(digits_arrays()[1])
    if split == "all":
        return torch.arange(labels.shape[0])
    train, val = stratified_split(labels, val_fraction=DIGITS_VAL_FRACTION, seed=DIGITS_SPLIT_SEED)
    return train if split == "train" else val


def load_digits_dataset(
    split: str = "val", *, model: nn.Module | None = None, transform: Callable | None = None
) -> LabelledImages:
    """The digits ``split`` transformed for ``model`` (or by ``transform``; default: the embedded
    model's preprocessing, :data:`DIGITS_PREPROCESSING`). Images are transformed once and held in
    memory (1,797 x 3 x 32 x 32 floats = 22 MB at 32 px)."""
    indices = digits_split_indices(split)
    # an eval transform (the model's or the default) is deterministic and described by its repr
    key = None if transform is not None else (split, repr(resolve_transform(model, None, DIGITS_PREPROCESSING)))
    transform = resolve_transform(model, transform, DIGITS_PREPROCESSING)
    images, labels = digits_arrays()
    chosen = indices.tolist()
    tensors = _TRANSFORMED.get(key) if key is not None else None
    if tensors is None:
        tensors = torch.stack([transform(Image.fromarray(images[i]).convert("RGB")) for i in chosen])
        if key is not None and tensors.numel() * tensors.element_size() <= _CACHE_BYTES:
            _TRANSFORMED[key] = tensors
    return LabelledImages(TensorImages(tensors.clone()), torch.arange(len(chosen)), torch.from_numpy(labels[chosen]),
                          DIGITS_CLASS_NAMES, DIGITS_CLASS_NAMES, name="digits", split=split)


# Splits already put through an eval transform, by (split, the transform's repr); small ones only (the
# 32 px model's 1,437 train images are 18 MB; at 224 px a split would be 0.9 GB and is not kept).
_TRANSFORMED: dict[tuple[str, str], Tensor] = {}
_CACHE_BYTES = 64 * 2**20
