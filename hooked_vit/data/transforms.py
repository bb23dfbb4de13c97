"""Which eval transform (PIL image -> model-ready float tensor) a data source applies."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from timm.data import create_transform, resolve_data_config
from torch import nn


def transform_from_preprocessing(preprocessing: Mapping[str, Any]) -> Callable:
    """timm's eval transform for a preprocessing dict (``input_size``, ``mean``, ``std``,
    ``crop_pct``, ``interpolation``; as in ``pretrained_configs/*.json``): resize, center crop,
    to tensor in [0, 1], normalize."""
    config = resolve_data_config(pretrained_cfg=dict(preprocessing))
    return create_transform(**config, is_training=False)


def model_transform(model: nn.Module) -> Callable:
    """The eval transform of ``model``: ``model.transform()`` for a HookedViT, else timm's
    ``resolve_data_config`` on the (timm) model's ``pretrained_cfg``."""
    method = getattr(model, "transform", None)
    if callable(method):
        return method()
    return create_transform(**resolve_data_config({}, model=model), is_training=False)


def resolve_transform(
    model: nn.Module | None, transform: Callable | None, default: Mapping[str, Any]
) -> Callable:
    """``transform`` if given, else the model's eval transform, else that of ``default`` preprocessing."""
    if transform is not None and model is not None:
        raise ValueError("pass model= or transform=, not both (the model's transform would be ignored)")
    if transform is not None:
        return transform
    if model is not None:
        return model_transform(model)
    return transform_from_preprocessing(default)
