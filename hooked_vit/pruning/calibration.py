"""Calibration images for Wanda, from a tensor, a dataset or an image folder, with an identity
that names them (for metadata and the pruned-model cache).

Two samplings of a dataset (``sampling=``):

* ``"quick"`` (default of :func:`resolve_calibration`, the embedded model's preset):
  ``DEFAULT_N_CALIB = 128`` images drawn without replacement, class-balanced, eval transform;
* ``"reference"`` (Wanda's ViT code, the ImageNet models' preset): ``REFERENCE_N_CALIB = 4096``
  images drawn uniformly WITH replacement, each passed through the training augmentation (timm's
  DeiT training transform for image files; the embedded recipe's random affine for in-memory
  tensors such as digits).

Both use ``DEFAULT_CALIB_SEED = 0``; a tensor is used whole. With no calibration given, the train
split of the model's builtin dataset (``model.cfg.dataset``, e.g. ``"digits"``) is used.
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

from hooked_vit.errors import HookedViTError, InvalidArgumentError, InvalidTypeError
from hooked_vit.protocol import REFERENCE_N_CALIB, SAMPLINGS, check_sampling  # noqa: F401  (public here too)

DEFAULT_N_CALIB = 128
DEFAULT_CALIB_SEED = 0
# DeiT's training augmentation (as Wanda's image_classifiers build it): RandAugment m9, colour
# jitter 0.3, random erasing 0.25, on top of timm's random-resized crop and horizontal flip.
DEIT_TRAIN_AUGMENTATION = {"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.3, "re_prob": 0.25,
                           "re_mode": "pixel", "re_count": 1}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class MissingCalibrationError(HookedViTError, ValueError):
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
        raise InvalidArgumentError(f"n_calib must be a positive int (number of calibration images), got {n!r}")
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
        raise InvalidTypeError(f"calibration dataset must be indexable with a length, got {type(dataset).__name__}")
    if isinstance(dataset, LabelledImages):  # class-balanced draw, decoding only the chosen images
        images, _ = calibration_sample(dataset, min(n, len(dataset)), seed=seed).tensors()
    else:
        items = [dataset[i] for i in _sample_indices(len(dataset), n, seed)]
        images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
    identity = {"kind": "dataset", **description, "n": images.shape[0], "seed": seed, "sha256": tensor_digest(images)}
    return Calibration(images, identity)


def train_augmentation(model: Any) -> Any:
    """timm's training transform (PIL image -> tensor) for ``model``'s input size and normalisation,
    with DeiT's augmentation (:data:`DEIT_TRAIN_AUGMENTATION`)."""
    from timm.data import create_transform, resolve_data_config

    size = (model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)
    pretrained_cfg = {**model.cfg.preprocessing, "input_size": size}
    config = resolve_data_config(pretrained_cfg=pretrained_cfg)
    return create_transform(**config, is_training=True, **DEIT_TRAIN_AUGMENTATION)


def _augment_tensors(model: Any, images: Float[Tensor, "n channel height width"],
                     generator: torch.Generator) -> Float[Tensor, "n channel height width"]:
    """The embedded training recipe's augmentation (random rotation, scale, shift per image)."""
    from hooked_vit.training import TrainConfig, random_affine

    recipe = TrainConfig()
    fill = -torch.tensor(model.cfg.preprocessing["mean"]) / torch.tensor(model.cfg.preprocessing["std"])
    return random_affine(images, generator=generator, max_rotation_deg=recipe.max_rotation_deg,
                         max_scale_change=recipe.max_scale_change, max_shift=recipe.max_shift, fill=fill)


def _reference_sample(model: Any, dataset: Any, n: int, seed: int, description: dict[str, Any]) -> Calibration:
    """``n`` images drawn uniformly with replacement from ``dataset`` (a LabelledImages), each
    augmented as in training; deterministic given ``seed``."""
    import random

    import numpy

    from hooked_vit.data import FileImages, LabelledImages

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"n_calib must be a positive int (number of calibration images), got {n!r}")
    if not isinstance(dataset, LabelledImages):
        raise InvalidTypeError("reference calibration sampling needs a dataset from hooked_vit.data.load_dataset "
                               f"(to re-read its images with the training augmentation), got {type(dataset).__name__}")
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(len(dataset), (n,), generator=generator)
    if isinstance(dataset.store, FileImages):
        augmented = FileImages(dataset.store.paths, train_augmentation(model))
        states = random.getstate(), numpy.random.get_state()  # timm's augmentations draw from all three RNGs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            numpy.random.seed(seed)
            images = torch.stack([augmented.load(int(dataset.store_indices[p])) for p in positions])
        random.setstate(states[0])
        numpy.random.set_state(states[1])
    else:
        images = _augment_tensors(model, dataset.subset(positions).tensors(show_progress=False)[0], generator)
    identity = {"kind": "dataset", **description, "n": n, "seed": seed, "sampling": "reference",
                "sha256": tensor_digest(images)}
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
                        seed: int = DEFAULT_CALIB_SEED, sampling: str = "quick") -> Calibration:
    """Calibration images and identity for ``model`` from ``calibration``:

    * a :class:`Calibration` (returned as is);
    * a tensor ``[n, channel, height, width]`` (model-ready, used whole);
    * a path: an ImageNet-style root with a ``train/<class>/`` split (read with
      :func:`hooked_vit.data.load_dataset`), else any folder of images (searched recursively, ``n``
      files drawn uniformly with ``seed``, preprocessed with ``model.transform()``);
    * a builtin dataset name (``"digits"``, ``"builtin"``): its train split;
    * a dataset of ``(image, label)`` items; a :class:`~hooked_vit.data.LabelledImages` is sampled
      class-balanced (:func:`hooked_vit.data.calibration_sample`), others uniformly.

    Datasets and folders give ``min(n, size)`` images drawn with ``seed``; with
    ``sampling="reference"`` a dataset (or ImageNet-style root, or builtin name) gives exactly ``n``
    images drawn with replacement and augmented as in training (see the module docstring).
    * ``None``: the train split of the model's builtin dataset, else :class:`MissingCalibrationError`.
    """
    if isinstance(calibration, Calibration):
        return calibration
    sampling = check_sampling(sampling)
    if isinstance(calibration, Tensor):
        if calibration.ndim != 4 or calibration.shape[0] == 0:
            raise InvalidArgumentError("calibration tensor must be non-empty images [n, channel, height, width], "
                                       f"got shape {list(calibration.shape)}")
        identity = {"kind": "tensor", "n": calibration.shape[0], "shape": list(calibration.shape),
                    "sha256": tensor_digest(calibration)}
        return Calibration(calibration, identity)
    if isinstance(calibration, (str, os.PathLike)):
        from hooked_vit.data import BUILTIN_DATASETS

        path = Path(calibration)
        if path.is_dir() and (path / "train").is_dir():  # ImageNet-style root/train/<class>/*
            dataset, description = _train_split(model, str(path))
            return _draw(model, dataset, n, seed, {**description, "path": str(path.resolve())}, sampling)
        if path.is_dir():
            return _from_folder(model, path, n, seed)
        if str(calibration) not in (*BUILTIN_DATASETS, "builtin"):
            raise MissingCalibrationError(
                f"calibration={str(calibration)!r} is neither a folder of images nor a builtin dataset "
                f"({', '.join(sorted(BUILTIN_DATASETS))}); pass a folder path, an image tensor or a dataset"
            )
        dataset, description = _train_split(model, str(calibration))
        return _draw(model, dataset, n, seed, description, sampling)
    if calibration is None:
        from hooked_vit.data import BUILTIN_DATASETS

        if getattr(model.cfg, "dataset", None) not in BUILTIN_DATASETS:
            raise _missing(model)
        dataset, description = _train_split(model, model.cfg.dataset)
        return _draw(model, dataset, n, seed, description, sampling)
    description = {"name": getattr(calibration, "name", type(calibration).__name__),
                   "split": getattr(calibration, "split", None)}
    return _draw(model, calibration, n, seed, description, sampling)


def _draw(model: Any, dataset: Any, n: int, seed: int, description: dict[str, Any], sampling: str) -> Calibration:
    if sampling == "reference":
        return _reference_sample(model, dataset, n, seed, description)
    return _from_dataset(dataset, n, seed, description)
