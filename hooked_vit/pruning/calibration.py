"""Calibration images for Wanda, from a tensor, a dataset or an image folder, with an identity
that names them (for metadata and the pruned-model cache).

Defaults: ``DEFAULT_N_CALIB = 128`` images, drawn without replacement with ``DEFAULT_CALIB_SEED = 0``
from a dataset (class-balanced) or folder; a tensor is used whole. With no calibration given, the
train split of the model's builtin dataset (``model.cfg.dataset``, e.g. ``"digits"``) is used.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

DEFAULT_N_CALIB = 128
DEFAULT_CALIB_SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class MissingCalibrationError(ValueError):
    """Wanda needs calibration images and none were given or can be derived."""


@dataclass
class Calibration:
    """Calibration images ``[n, channel, height, width]`` and a JSON-able identity of them."""

    images: Tensor
    identity: dict[str, Any]


def tensor_digest(images: Float[Tensor, "n channel height width"]) -> str:
    """SHA-256 of the images' float32 values and shape (hex), independent of device and dtype."""
    data = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256(str(list(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _sample_indices(total: int, n: int, seed: int) -> list[int]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_calib must be a positive int (number of calibration images), got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[: min(n, total)].tolist())


def _from_folder(model: Any, folder: Path, n: int, seed: int) -> Calibration:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise MissingCalibrationError(f"calibration folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    transform = model.transform()
    chosen = [files[i] for i in _sample_indices(len(files), n, seed)]
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in chosen])
    identity = {"kind": "folder", "path": str(folder.resolve()), "n_files": len(files), "n": len(chosen),
                "seed": seed, "sha256": tensor_digest(images)}
    return Calibration(images, identity)


def _from_dataset(dataset: Any, n: int, seed: int, description: dict[str, Any]) -> Calibration:
    from hooked_vit.data import LabelledImages, calibration_sample

    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"calibration dataset must be indexable with a length, got {type(dataset).__name__}")
    if isinstance(dataset, LabelledImages):  # class-balanced draw, decoding only the chosen images
        images, _ = calibration_sample(dataset, min(n, len(dataset)), seed=seed).tensors()
    else:
        items = [dataset[i] for i in _sample_indices(len(dataset), n, seed)]
        images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
    identity = {"kind": "dataset", **description, "n": images.shape[0], "seed": seed, "sha256": tensor_digest(images)}
    return Calibration(images, identity)


def _train_split(model: Any, source: str) -> tuple[Any, dict[str, Any]]:
    from hooked_vit.data import load_dataset

    dataset = load_dataset(source, split="train", model=model)
    return dataset, {"name": dataset.name, "split": "train"}


def _missing(model: Any) -> MissingCalibrationError:
    dataset = getattr(model.cfg, "dataset", None)
    return MissingCalibrationError(
        f"Wanda needs calibration images and model {model.cfg.model_name!r} (dataset {dataset!r}) has no builtin "
        "dataset to draw them from. Pass calibration= as an image tensor [n, 3, H, W] preprocessed with "
        "model.transform(), a folder of images or an ImageNet-style root with a train/ split (e.g. "
        "calibration='/data/imagenet'), or a dataset from hooked_vit.data.load_dataset; or use "
        "method='magnitude', which needs none."
    )


def resolve_calibration(model: Any, calibration: Any = None, *, n: int = DEFAULT_N_CALIB,
                        seed: int = DEFAULT_CALIB_SEED) -> Calibration:
    """Calibration images and identity for ``model`` from ``calibration``:

    * a :class:`Calibration` (returned as is);
    * a tensor ``[n, channel, height, width]`` (model-ready, used whole);
    * a path: an ImageNet-style root with a ``train/<class>/`` split (read with
      :func:`hooked_vit.data.load_dataset`), else any folder of images (searched recursively, ``n``
      files drawn uniformly with ``seed``, preprocessed with ``model.transform()``);
    * a builtin dataset name (``"digits"``, ``"builtin"``): its train split;
    * a dataset of ``(image, label)`` items; a :class:`~hooked_vit.data.LabelledImages` is sampled
      class-balanced (:func:`hooked_vit.data.calibration_sample`), others uniformly.

    Datasets and folders give ``min(n, size)`` images drawn with ``seed``.
    * ``None``: the train split of the model's builtin dataset, else :class:`MissingCalibrationError`.
    """
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, Tensor):
        if calibration.ndim != 4 or calibration.shape[0] == 0:
            raise ValueError("calibration tensor must be non-empty images [n, channel, height, width], "
                             f"got shape {list(calibration.shape)}")
        identity = {"kind": "tensor", "n": calibration.shape[0], "shape": list(calibration.shape),
                    "sha256": tensor_digest(calibration)}
        return Calibration(calibration, identity)
    if isinstance(calibration, (str, os.PathLike)):
        from hooked_vit.data import BUILTIN_DATASETS

        path = Path(calibration)
        if path.is_dir() and (path / "train").is_dir():  # ImageNet-style root/train/<class>/*
            dataset, description = _train_split(model, str(path))
            return _from_dataset(dataset, n, seed, {**description, "path": str(path.resolve())})
        if path.is_dir():
            return _from_folder(model, path, n, seed)
        if str(calibration) not in (*BUILTIN_DATASETS, "builtin"):
            raise MissingCalibrationError(
                f"calibration={str(calibration)!r} is neither a folder of images nor a builtin dataset "
                f"({', '.join(sorted(BUILTIN_DATASETS))}); pass a folder path, an image tensor or a dataset"
            )
        dataset, description = _train_split(model, str(calibration))
        return _from_dataset(dataset, n, seed, description)
    if calibration is None:
        from hooked_vit.data import BUILTIN_DATASETS

        if getattr(model.cfg, "dataset", None) not in BUILTIN_DATASETS:
            raise _missing(model)
        dataset, description = _train_split(model, model.cfg.dataset)
        return _from_dataset(dataset, n, seed, description)
    description = {"name": getattr(calibration, "name", type(calibration).__name__),
                   "split": getattr(calibration, "split", None)}
    return _from_dataset(calibration, n, seed, description)
