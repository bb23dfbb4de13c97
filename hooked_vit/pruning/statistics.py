"""Wanda's input statistics: the L2 norm of each input feature of every pruned Linear, over every
token of every calibration image, gathered in one forward pass through the hooks feeding them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vit.errors import InvalidArgumentError, InvalidTypeError
from hooked_vit.pruning.layers import prunable_layers


def _batches(images: Tensor | Iterable, batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[0] == 0:
            raise InvalidArgumentError(f"calibration images must be a non-empty [n, channel, height, width] tensor, "
                                       f"got shape {list(images.shape)}")
        yield from images.split(batch_size)
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = batch.get("images", batch.get("image"))
        if not isinstance(batch, Tensor):
            raise InvalidTypeError("calibration batches must be image tensors, (images, labels) pairs or dicts with "
                                   f"an 'image(s)' key; got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def input_norms(
    model: torch.nn.Module,
    images: Float[Tensor, "n channel height width"] | Iterable,
    *,
    batch_size: int = 32,
) -> tuple[dict[str, Float[Tensor, " _in_features"]], int]:
    """``({layer name: ||X_j||_2 per input feature j}, number of tokens)`` for every pruned Linear.

    One pass of ``model`` as it is (call it on the dense model) over ``images`` (a tensor, split
    into ``batch_size`` chunks, or an iterable of image batches / ``(images, labels)`` pairs).
    Per batch, each hook's ``[batch, pos, ...]`` value is reduced to per-feature sums of squares
    over batch and positions, accumulated in float64; activations are never stored. Norms are
    float64 ``[in_features]`` in the activations' units, on the model's device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    layers = prunable_layers(model)
    param = next(model.parameters())
    sums = {layer.name: torch.zeros(layer.in_features, dtype=torch.float64, device=param.device) for layer in layers}
    by_hook: dict[str, list[str]] = {}
    for layer in layers:
        by_hook.setdefault(layer.input_hook, []).append(layer.name)

    def accumulate(value: Tensor, hook) -> None:
        # Per-batch fp32 sums of squares over batch and positions (one activation-sized temporary),
        # accumulated in fp64; hook_z's [head, d_head] flattens head-major to proj's d_model input.
        value = value if value.dtype in (torch.float32, torch.float64) else value.float()
        batch_sums = value.square().sum(dim=(0, 1)).reshape(-1).to(torch.float64)
        for name in by_hook[hook.name]:
            sums[name] += batch_sums

    n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with model.hooks(fwd_hooks=[(name, accumulate) for name in by_hook]):
            for batch in _batches(images, batch_size):
                batch = batch.to(device=param.device, dtype=param.dtype)
                model(batch)
                n_tokens += batch.shape[0] * model.cfg.n_ctx
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise InvalidArgumentError("calibration data yielded no images; Wanda needs at least one calibration image")
    return {name: s.sqrt() for name, s in sums.items()}, n_tokens
