"""The dense model and its pruned variants, as every IMPACT analysis loads and files them."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from hooked_vit.data import resolve_device


def load_variant(model: str, sparsity: float, *, method: str = "wanda", finetune_epochs: int = 0,
                 device: str | None = None) -> nn.Module:
    """``model`` at ``sparsity`` (dense at 0), pruned with ``method`` and fine-tuned for
    ``finetune_epochs`` (cached on disk by :meth:`HookedViT.from_pretrained`), on ``device``
    (default CUDA when available)."""
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained(model, device=resolve_device(device), sparsity=float(sparsity) or None,
                                     method=method, finetune=finetune_epochs or None)


def sparsity_dir(out: str | os.PathLike, sparsity: float) -> Path:
    """``<out>/sparsity_<s>``: where an analysis files one model's results."""
    return Path(out) / f"sparsity_{float(sparsity):g}"
