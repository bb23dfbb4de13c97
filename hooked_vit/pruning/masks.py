"""Pruning masks as ``weight_mask`` bool buffers on each pruned ``nn.Linear``, and their upkeep.

The mask is the truth: a weight is pruned iff its mask entry is ``False``, and every function here
that changes weights keeps pruned weights exactly ``0.0``. Buffers travel with ``state_dict()``,
``.to()`` and :meth:`~hooked_vit.HookedViT.save_pretrained`.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from hooked_vit.errors import CheckpointMismatchError, InvalidArgumentError
from hooked_vit.pruning.layers import prunable_layers

MASK_NAME = "weight_mask"
MASK_SUFFIX = "." + MASK_NAME


def set_mask(linear: nn.Linear, keep: Bool[Tensor, "out_features in_features"]) -> None:
    """Store ``keep`` as ``linear.weight_mask`` (created if absent) and zero the pruned weights."""
    if keep.shape != linear.weight.shape or keep.dtype != torch.bool:
        raise InvalidArgumentError(f"mask must be a bool tensor of the weight's shape {list(linear.weight.shape)}, "
                                   f"got {keep.dtype} {list(keep.shape)}")
    keep = keep.to(linear.weight.device)
    if hasattr(linear, MASK_NAME):
        getattr(linear, MASK_NAME).copy_(keep)
    else:
        linear.register_buffer(MASK_NAME, keep.clone())
    with torch.no_grad():
        linear.weight.masked_fill_(~keep, 0.0)


def masked_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` carrying a ``weight_mask``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, MASK_NAME)}


def is_pruned(model: nn.Module) -> bool:
    """Whether any Linear of ``model`` carries a pruning mask."""
    return bool(masked_linears(model))


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Set every masked weight of ``model`` back to exactly ``0.0`` (e.g. after an optimizer step)."""
    for linear in masked_linears(model).values():
        linear.weight.masked_fill_(~getattr(linear, MASK_NAME), 0.0)


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    """Zero the gradient of every masked weight, so optimizers see no signal there."""
    for linear in masked_linears(model).values():
        if linear.weight.grad is not None:
            linear.weight.grad.masked_fill_(~getattr(linear, MASK_NAME), 0.0)


def remove_masks(model: nn.Module) -> None:
    """Delete the ``weight_mask`` buffers (weights stay as they are)."""
    for linear in masked_linears(model).values():
        delattr(linear, MASK_NAME)


@torch.no_grad()
def rezero_masked_weights(model: nn.Module, source: str) -> int:
    """Set masked weights that are not ``0.0`` back to zero (a checkpoint edited or fine-tuned
    without the masks), warning with their count and ``source``; returns that count."""
    count = 0
    for linear in masked_linears(model).values():
        stray = (linear.weight != 0) & ~getattr(linear, MASK_NAME)
        count += int(stray.sum())
        linear.weight.masked_fill_(~getattr(linear, MASK_NAME), 0.0)
    if count:
        warnings.warn(f"{source}: {count} pruned weights (weight_mask False) were not zero; set them to 0.0 "
                      "as the masks say", RuntimeWarning, stacklevel=3)
    return count


def prepare_for_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Create the ``weight_mask`` buffers that ``state_dict`` holds, so ``load_state_dict`` fits."""
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith(MASK_SUFFIX):
            continue
        name = key[: -len(MASK_SUFFIX)]
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise CheckpointMismatchError(f"state dict has a pruning mask {key!r} but {name!r} is not a Linear of the model")
        if not hasattr(linear, MASK_NAME):
            linear.register_buffer(MASK_NAME, torch.ones_like(linear.weight, dtype=torch.bool))


def without_masks(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` minus its ``weight_mask`` entries, masked weights zeroed (e.g. for timm)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(MASK_SUFFIX):
            continue
        mask = state_dict.get(key[: -len(".weight")] + MASK_SUFFIX) if key.endswith(".weight") else None
        out[key] = value.masked_fill(~mask, 0.0) if mask is not None else value
    return out


@torch.no_grad()
def measured_sparsity(model: nn.Module) -> tuple[dict[str, float], float]:
    """``({layer: fraction of exact zeros in its weight}, overall fraction)`` over the prunable
    Linears (block qkv/proj/fc1/fc2), counted from the weights themselves, not the masks."""
    per_layer, zeros, total = {}, 0, 0
    for layer in prunable_layers(model):
        weight = layer.module.weight
        n_zero = int((weight == 0).sum())
        per_layer[layer.name] = n_zero / weight.numel()
        zeros += n_zero
        total += weight.numel()
    return per_layer, zeros / total
