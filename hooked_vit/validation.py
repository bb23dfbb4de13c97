"""Checks on what users hand the model, each failing with what was wrong and what would be right."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import InvalidArgumentError, InvalidTypeError, UnknownNameError


def check_images(images: object, cfg: HookedViTConfig, param: Tensor | None) -> None:
    """Raise ``InvalidArgumentError``/``InvalidTypeError`` (``ValueError``/``TypeError``) unless
    ``images`` is a finite float ``[batch, in_chans, img_size, img_size]`` tensor on ``param``'s
    device and dtype (``param=None``, e.g. a model's absent class token: device and dtype are left
    to the model's own forward, which checks them against its patch embedding)."""
    expected = f"[batch, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}]"
    if not isinstance(images, Tensor):
        raise InvalidTypeError(f"images must be a torch.Tensor of shape {expected}, got {type(images).__name__}")
    if images.ndim != 4:
        hint = " (add a batch dimension with images[None])" if images.ndim == 3 else ""
        raise InvalidArgumentError(f"images must have shape {expected}, got {list(images.shape)}{hint}")
    if images.shape[1] != cfg.in_chans:
        raise InvalidArgumentError(
            f"images have {images.shape[1]} channels, the model expects {cfg.in_chans} "
            f"(shape {expected}, channels first); got shape {list(images.shape)}"
        )
    if tuple(images.shape[2:]) != (cfg.img_size, cfg.img_size):
        raise InvalidArgumentError(
            f"images are {images.shape[2]}x{images.shape[3]} pixels, the model expects "
            f"{cfg.img_size}x{cfg.img_size}; resize/crop them with model.transform()"
        )
    if not torch.is_floating_point(images):
        raise InvalidTypeError(
            f"images have dtype {images.dtype}; the model expects normalized floats: "
            "apply model.transform() or images.to(torch.float32) and normalize"
        )
    if param is not None and images.dtype != param.dtype:
        raise InvalidTypeError(f"images have dtype {images.dtype} but the model is {param.dtype}: use images.to({param.dtype})")
    if param is not None and images.device != param.device:
        raise InvalidArgumentError(f"images are on {images.device} but the model is on {param.device}: use images.to('{param.device}')")
    if not torch.isfinite(images).all():
        raise InvalidArgumentError("images contain NaN or infinite values")


def check_hook_names(names: Iterable[str], known: Iterable[str]) -> None:
    """Raise ``UnknownNameError`` (a ``KeyError``) naming each unknown hook with its closest known names."""
    known = list(known)
    known_set = set(known)
    problems = []
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"{name!r}{hint}")
    if problems:
        raise UnknownNameError(
            f"Unknown hook name(s): {'; '.join(problems)}. List them with model.hook_dict.keys() "
            "or see the hook table in the README."
        )


RETURN_TYPES = ("logits", "loss", "both", None)


def check_return_type(return_type: object, labels: object, batch: int, n_classes: int) -> None:
    """One-line error unless ``return_type`` is one of :data:`RETURN_TYPES` and, for ``"loss"`` and
    ``"both"``, ``labels`` is an integer tensor ``[batch]`` of classes ``0..n_classes-1``."""
    if return_type not in RETURN_TYPES:
        raise InvalidArgumentError(f"unknown return_type {return_type!r}; choose one of "
                                   f"{', '.join(map(repr, RETURN_TYPES))}")
    if return_type not in ("loss", "both"):
        return
    if labels is None:
        raise InvalidArgumentError(f"return_type={return_type!r} needs labels=, the class of each image "
                                   f"(an integer tensor [{batch}]): a ViT's loss is against labels, not its input")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InvalidTypeError(f"labels must be an integer tensor [{batch}] of classes, got "
                               f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != (batch,):
        raise InvalidArgumentError(f"labels of shape {list(labels.shape)} do not fit {batch} images: give one class "
                                   f"per image, shape [{batch}]")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise InvalidArgumentError(f"label {bad} is outside the model's classes 0..{n_classes - 1}")


def check_stop_at_layer(stop_at_layer: object, n_layers: int) -> None:
    """``InvalidArgumentError`` unless ``stop_at_layer`` is ``None`` or an int in
    ``[-n_layers, n_layers]`` (TransformerLens semantics: blocks ``[:stop_at_layer]`` run)."""
    if stop_at_layer is None:
        return
    if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int):
        raise InvalidTypeError(f"stop_at_layer must be None or an int, got {type(stop_at_layer).__name__} "
                               f"{stop_at_layer!r}")
    if not -n_layers <= stop_at_layer <= n_layers:
        raise InvalidArgumentError(
            f"stop_at_layer={stop_at_layer} is out of range for a model with {n_layers} blocks: use 0..{n_layers} "
            f"(the residual stream entering that block; {n_layers} = after the last block) or -{n_layers}..-1"
        )


def shape_checked_hook(hook: Callable, name: object, dir: str = "fwd") -> Callable:
    """``hook`` wrapped so that a forward hook returning anything but ``None`` or a tensor of the
    activation's shape raises :class:`~hooked_vit.errors.InvalidArgumentError` naming the hook point
    (instead of a shape error further on, or none at all). Backward hooks are returned unchanged."""
    if dir != "fwd" or getattr(hook, "_shape_checked", False):
        return hook

    @functools.wraps(hook)
    def checked(activation, *args, **kwargs):
        result = hook(activation, *args, **kwargs)
        if result is None or not isinstance(activation, Tensor):
            return result
        point = getattr(kwargs.get("hook"), "name", None) or name
        if not isinstance(result, Tensor):
            raise InvalidTypeError(f"the hook on {point} returned a {type(result).__name__}; a forward hook must "
                                   f"return None or a tensor of the activation's shape {list(activation.shape)}")
        if result.shape != activation.shape:
            raise InvalidArgumentError(
                f"the hook on {point} returned a tensor of shape {list(result.shape)}; a forward hook must return "
                f"None or a tensor of the activation's shape {list(activation.shape)}")
        return result

    checked._shape_checked = True
    return checked
