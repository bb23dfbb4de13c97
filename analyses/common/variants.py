"""The dense model and its pruned variants, as every IMPACT analysis loads and files them."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from analyses.common.family import ModelFamily, variant_settings
from hooked_vit.data import resolve_device


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


def load_model(config: ModelFamily, sparsity: float) -> nn.Module:
    """``config.model`` at ``sparsity`` (dense at 0), pruned and fine-tuned from ``config.data``'s
    train split by the family's settings (:func:`load_variant`, cached on disk), on ``config.device``."""
    return load_variant(config.model, sparsity, method=config.method, finetune_epochs=config.finetune_epochs,
                        data=config.data, n_calib=config.n_calib, calib_sampling=config.calib_sampling,
                        device=config.device)
