"""Checks on what users hand the model, each failing with what was wrong and what would be right."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from torch import Tensor

from hooked_vit.config import HookedViTConfig


def check_images(images: object, cfg: HookedViTConfig, param: Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``images`` is a finite float
    ``[batch, in_chans, img_size, img_size]`` tensor on ``param``'s device and dtype."""
    expected = f"[batch, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}]"
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape {expected}, got {type(images).__name__}")
    if images.ndim != 4:
        hint = " (add a batch dimension with images[None])" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape {expected}, got {list(images.shape)}{hint}")
    if images.shape[1] != cfg.in_chans:
        raise ValueError(
            f"images have {images.shape[1]} channels, the model expects {cfg.in_chans} "
            f"(shape {expected}, channels first); got shape {list(images.shape)}"
        )
    if tuple(images.shape[2:]) != (cfg.img_size, cfg.img_size):
        raise ValueError(
            f"images are {images.shape[2]}x{images.shape[3]} pixels, the model expects "
            f"{cfg.img_size}x{cfg.img_size}; resize/crop them with model.transform()"
        )
    if not torch.is_floating_point(images):
        raise TypeError(
            f"images have dtype {images.dtype}; the model expects normalized floats ({param.dtype}): "
            "apply model.transform() or images.to(torch.float32) and normalize"
        )
    if images.dtype != param.dtype:
        raise TypeError(f"images have dtype {images.dtype} but the model is {param.dtype}: use images.to({param.dtype})")
    if images.device != param.device:
        raise ValueError(f"images are on {images.device} but the model is on {param.device}: use images.to('{param.device}')")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")


def check_hook_names(names: Iterable[str], known: Iterable[str]) -> None:
    """Raise ``KeyError`` naming each unknown hook with its closest known names."""
    known = list(known)
    known_set = set(known)
    problems = []
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"{name!r}{hint}")
    if problems:
        raise KeyError(
            f"Unknown hook name(s): {'; '.join(problems)}. List them with model.hook_dict.keys() "
            "or see the hook table in the README."
        )

