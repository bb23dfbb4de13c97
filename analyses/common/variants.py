"""The dense model and its pruned variants, as every IMPACT analysis loads and files them."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from analyses.common.defaults import DEFAULT_MODEL, DEFAULT_SPARSITIES
from hooked_vit.data import resolve_device
from hooked_vit.errors import InvalidArgumentError


def variant_settings(model: str, *, finetune_epochs: int | None = None, n_calib: int | None = None,
                     calib_sampling: str | None = None) -> dict[str, Any]:
    """``finetune_epochs``, ``n_calib`` and ``calib_sampling`` with every ``None`` replaced by the
    model preset's protocol (:func:`hooked_vit.pruning.recipe.variant_protocol`: the paper's 2
    epochs everywhere, Wanda's 4,096 augmented draws for ImageNet models and 128 images for the
    embedded digits model)."""
    from hooked_vit.pruning.recipe import variant_protocol

    given = {"finetune_epochs": finetune_epochs, "n_calib": n_calib, "calib_sampling": calib_sampling}
    protocol = variant_protocol(model)
    return {key: protocol[key] if value is None else value for key, value in given.items()}


def load_variant(model: str, sparsity: float, *, method: str = "wanda", finetune_epochs: int | None = None,
                 data: str | os.PathLike = "builtin", n_calib: int | None = None, calib_sampling: str | None = None,
                 calib_seed: int = 0, device: str | None = None) -> nn.Module:
    """``model`` at ``sparsity`` (dense at 0), pruned with ``method`` on calibration images from the
    train split of ``data`` (the dataset the analysis reads: ``"builtin"`` or an ImageNet-style
    root), then fine-tuned with the masks for ``finetune_epochs`` on that same train split; ``None``
    settings come from the model's preset (:func:`variant_settings`); ``finetune_epochs=0`` skips
    fine-tuning. Variants are cached on disk (:func:`hooked_vit.pruning.recipe.pruned_model`); the
    model lands on ``device`` (default CUDA when available)."""
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset
    from hooked_vit.pruning.recipe import pruned_model

    dense = HookedViT.from_pretrained(model, device=resolve_device(device))
    if not float(sparsity):
        return dense
    settings = variant_settings(model, finetune_epochs=finetune_epochs, n_calib=n_calib, calib_sampling=calib_sampling)
    train = load_dataset(data, split="train", model=dense)
    epochs = settings["finetune_epochs"]
    return pruned_model(dense, sparsity=float(sparsity), method=method, calibration=data,
                        n_calib=settings["n_calib"], calib_seed=calib_seed, calib_sampling=settings["calib_sampling"],
                        finetune={"epochs": epochs, "data": train} if epochs else None)


def sparsity_dir(out: str | os.PathLike, sparsity: float) -> Path:
    """``<out>/sparsity_<s>``: where an analysis files one model's results."""
    return Path(out) / f"sparsity_{float(sparsity):g}"


@dataclass
class ModelFamily:
    """The dense model and its pruned variants a level runs over (the fields every level config
    starts with).

    ``model`` (alias or saved folder) pruned with ``method`` at each of ``sparsities`` (0 = dense),
    Wanda calibrated on ``n_calib`` train images of ``dataset`` drawn by ``calib_sampling``, then
    ``finetune_epochs`` of masked fine-tuning on that train split (``None``: the model preset's
    protocol, :func:`variant_settings`, filled in on construction). ``dataset``: source for
    :func:`hooked_vit.data.load_dataset` (``"builtin"``: the model's own). ``device``: default CUDA
    when available.
    """

    model: str = DEFAULT_MODEL
    dataset: str = "builtin"
    sparsities: tuple[float | int, ...] = DEFAULT_SPARSITIES
    method: str = "wanda"
    finetune_epochs: int | None = None
    n_calib: int | None = None
    calib_sampling: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        self.__dict__.update(variant_settings(self.model, finetune_epochs=self.finetune_epochs, n_calib=self.n_calib,
                                              calib_sampling=self.calib_sampling))
        if not self.sparsities:
            raise InvalidArgumentError("sparsities must hold at least one value in [0, 1) (0 is the dense model)")
        for s in self.sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
                raise InvalidArgumentError(f"sparsities must lie in [0, 1), got {s!r}")


FAMILY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModelFamily))


def load_model(config: ModelFamily, sparsity: float) -> nn.Module:
    """``config.model`` at ``sparsity`` (dense at 0), pruned and fine-tuned from ``config.dataset``'s
    train split by the family's settings (:func:`load_variant`, cached on disk), on ``config.device``."""
    return load_variant(config.model, sparsity, method=config.method, finetune_epochs=config.finetune_epochs,
                        data=config.dataset, n_calib=config.n_calib, calib_sampling=config.calib_sampling,
                        device=config.device)
