"""Insertion and deletion: how faithful an attribution map is (IMPACT sec. 3.5; RISE semantics).

For each image the explained class is the clean argmax and the score is its softmax probability.
The map is upsampled bilinearly to the pixels; pixels are ranked by decreasing relevance (stable
sort: ties keep pixel order). Insertion starts from the reference image and reveals ``step`` pixels
of the image per step; deletion starts from the image and replaces ``step`` pixels per step by the
reference. With ``n = ceil(H * W / step)`` steps a curve has ``n + 1`` scores at fractions
``0, 1/n, ..., 1``; the AUC is the trapezoid over ``[0, 1]``. Default ``step``: the image width
(225 scores at 224 px, 33 at 32 px).

References (the image the pixels move from / to): ``"zero"`` a zero model input (the paper's
"zero-valued reference"; after normalisation it is the dataset's mean colour), ``"black"`` pixel
value 0 before normalisation, ``"blur"`` RISE's Gaussian blur (11 x 11 kernel, sigma 5) of the
image, ``"mean"`` each image's own per-channel mean colour.

The perturbed images of all images and steps go through the model in batches of ``batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.model.config import REFERENCES
from hooked_vit.errors import InvalidArgumentError

BLUR_KERNEL, BLUR_SIGMA = 11, 5.0  # RISE's gkern(11, 5)


@dataclass
class InsertionDeletion:
    """Per image: ``insertion_auc`` and ``deletion_auc`` ``[batch]``, the ``curves``
    (``{"insertion": [batch n_scores], "deletion": [batch n_scores]}``, probabilities of ``target``
    after ``0, 1, ..., n`` steps; ``fractions`` ``[n_scores]`` = step / n, the AUC's x axis), the
    explained class ``target`` ``[batch]``."""

    insertion_auc: Tensor
    deletion_auc: Tensor
    curves: dict[str, Tensor]
    fractions: Tensor
    target: Tensor
    reference: str
    step: int


def auc(curves: Float[Tensor, "*batch n_scores"]) -> Float[Tensor, "*batch"]:
    """Trapezoid area of equally spaced scores over ``[0, 1]``."""
    n = curves.shape[-1] - 1
    return (curves.sum(-1) - (curves[..., 0] + curves[..., -1]) / 2) / n


def gaussian_blur(images: Float[Tensor, "batch channel height width"], size: int = BLUR_KERNEL,
                  sigma: float = BLUR_SIGMA) -> Float[Tensor, "batch channel height width"]:
    """Per-channel Gaussian blur with zero padding (RISE's blur substrate)."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel_1d = torch.exp(-x**2 / (2 * sigma**2))
    kernel = torch.outer(kernel_1d, kernel_1d)
    kernel = (kernel / kernel.sum()).to(images)
    channels = images.shape[1]
    weight = kernel.expand(channels, 1, size, size)
    return F.conv2d(images, weight, padding=size // 2, groups=channels)


def reference_images(model: nn.Module, images: Float[Tensor, "batch channel height width"],
                     reference: str) -> Float[Tensor, "batch channel height width"]:
    """The image pixels move from (insertion) or to (deletion); see the module docstring."""
    if reference == "zero":
        return torch.zeros_like(images)
    if reference == "black":
        pre = getattr(model.cfg, "preprocessing", {}) or {}
        mean = torch.tensor(pre.get("mean", [0.0] * images.shape[1]), dtype=images.dtype, device=images.device)
        std = torch.tensor(pre.get("std", [1.0] * images.shape[1]), dtype=images.dtype, device=images.device)
        return ((0 - mean) / std)[None, :, None, None].expand_as(images).clone()
    if reference == "blur":
        return gaussian_blur(images)
    return images.mean((2, 3), keepdim=True).expand_as(images).clone()


def pixel_ranks(maps: Float[Tensor, "batch map_h map_w"], height: int, width: int) -> Int[Tensor, "batch pixels"]:
    """Per pixel (row-major) its position in the order of decreasing relevance of the bilinearly
    upsampled map (stable: ties in pixel order)."""
    up = maps if maps.shape[-2:] == (height, width) else F.interpolate(
        maps[:, None].to(torch.float32), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    order = torch.sort(up.reshape(maps.shape[0], -1), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def check_inputs(model: nn.Module, images: Tensor, maps: Tensor, reference: str, step: int | None) -> None:
    """One-line errors on a bad reference, step, image or map, before any work."""
    from hooked_vit.validation import check_images

    if reference not in REFERENCES:
        raise InvalidArgumentError(f"unknown reference {reference!r}; choose one of {', '.join(map(repr, REFERENCES))}")
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        check_images(images, cfg, next(model.parameters()))
    n_pixels = images.shape[-1] * images.shape[-2]
    if step is not None and not 1 <= step <= n_pixels:
        raise InvalidArgumentError(f"step {step} must lie in 1..{n_pixels} (pixels per image)")
    if maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise InvalidArgumentError(
            f"maps of shape {list(maps.shape)} do not fit {images.shape[0]} images: give [batch, h, w] with "
            f"batch {images.shape[0]} (e.g. [batch, grid, grid] or [batch, {images.shape[2]}, {images.shape[3]}])")
    if not torch.isfinite(maps).all():
        raise InvalidArgumentError("maps contain NaN or infinite values")


@torch.no_grad()
def insertion_deletion(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    maps: Float[Tensor, "*map_shape"],
    reference: str = "zero",
    *,
    step: int | None = None,
    batch_size: int = 64,
) -> InsertionDeletion:
    """Insertion and deletion curves and AUCs of ``maps`` ``[batch h w]`` (any resolution, e.g. the
    patch grid or the pixels) for ``images`` (see the module docstring).
    ``step``: pixels moved per step (default the image width); ``batch_size``: perturbed images per
    forward pass."""
    check_inputs(model, images, maps, reference, step)
    batch, _, height, width = images.shape
    step = step or width
    n_pixels = height * width
    n_steps = math.ceil(n_pixels / step)
    target = model(images).argmax(-1)
    ref = reference_images(model, images, reference)
    ranks = pixel_ranks(maps.to(images.device), height, width).reshape(batch, 1, height, width)
    thresholds = torch.arange(n_steps + 1, device=images.device) * step  # pixels moved before each score
    curves = {}
    for kind, (start, finish) in {"insertion": (ref, images), "deletion": (images, ref)}.items():
        scores = torch.empty(batch * (n_steps + 1), dtype=torch.float32, device=images.device)
        for first in range(0, batch * (n_steps + 1), batch_size):
            flat = torch.arange(first, min(first + batch_size, batch * (n_steps + 1)), device=images.device)
            image, k = flat // (n_steps + 1), flat % (n_steps + 1)
            moved = ranks[image] < thresholds[k][:, None, None, None]  # [chunk 1 height width]
            perturbed = torch.where(moved, finish[image], start[image])
            probs = model(perturbed).float().softmax(-1)
            scores[first:first + flat.numel()] = probs.gather(1, target[image][:, None])[:, 0]
        curves[kind] = scores.reshape(batch, n_steps + 1)
    fractions = torch.arange(n_steps + 1, dtype=torch.float32) / n_steps  # the AUC's x axis, as RISE
    curves = {k: v.cpu() for k, v in curves.items()}
    return InsertionDeletion(auc(curves["insertion"]), auc(curves["deletion"]), curves, fractions,
                             target.cpu(), reference, step)


__all__ = ["InsertionDeletion", "REFERENCES", "auc", "gaussian_blur", "insertion_deletion", "pixel_ranks",
           "reference_images"]
