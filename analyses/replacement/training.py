"""Building a replacement model: the SAEs trained jointly (:func:`~analyses.replacement.saes.train_saes`)
and the per-token medians nodes are ablated to."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from analyses.replacement.config import ReplacementConfig
from analyses.replacement.replacement import ReplacementModel, compute_medians
from analyses.replacement.saes import resid_hooks, train_saes


def train_replacement(model: nn.Module, train: Any, config: ReplacementConfig | None = None, *,
                      checkpoint: str | os.PathLike | None = None, distributed: bool = True) -> ReplacementModel:
    """The replacement model of ``model`` trained on ``train`` (items ``(image, label)``) with
    ``config`` (default :class:`ReplacementConfig`): one sae-lens SAE per block but the last, all
    trained from one model forward per batch, then the per-token medians over ``median_images``
    train images. ``checkpoint``: a file the training state is saved to and resumed from. Under
    ``torchrun`` every process calls this: each trains on its share of every batch (gradients
    averaged) and all end with the same replacement model (``distributed=False``: this process
    alone trains it)."""
    config = config or ReplacementConfig()
    settings = config.layer_settings(len(resid_hooks(model)), model.cfg.d_model)
    saes, log, seconds = train_saes(
        model, train, settings, architecture=config.architecture, steps=config.steps,
        batch_images=config.batch_images, lr=config.lr, aux_coefficient=config.aux_coefficient,
        dead_steps=config.dead_steps, lr_decay=config.lr_decay, cls_repeats=config.cls_repeats, seed=config.seed,
        checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, distributed=distributed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:config.median_images]
    images = torch.stack([train[int(i)][0] for i in order])
    medians = compute_medians(model, saes, images, batch_size=config.batch_size or 64)
    info = {"layer_settings": [list(s) for s in settings], "architecture": config.architecture,
            "steps": config.steps, "lr_decay": config.lr_decay, "cls_repeats": config.cls_repeats,
            "train_seconds": seconds, "log": log}
    return ReplacementModel(saes, medians, config.objective, info)


__all__ = ["train_replacement"]
