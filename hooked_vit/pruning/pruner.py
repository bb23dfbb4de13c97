"""``prune``: Wanda or magnitude pruning of every Linear inside the blocks of a HookedViT, in place."""

from __future__ import annotations

import time
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from hooked_vit.errors import InvalidArgumentError
from hooked_vit.pruning.calibration import DEFAULT_CALIB_SEED, DEFAULT_N_CALIB, resolve_calibration
from hooked_vit.pruning.layers import prunable_layers
from hooked_vit.pruning.masks import is_pruned, measured_sparsity, set_mask
from hooked_vit.pruning.metadata import INFO_ATTR, PruningInfo
from hooked_vit.pruning.scores import keep_mask, magnitude_scores, wanda_scores
from hooked_vit.pruning.statistics import input_norms
from hooked_vit.pruning.validation import check_method, check_nm, check_nm_fits, check_sparsity

ROW_CHUNK = 256  # output rows scored and sorted at a time


def resolve_sparsity(sparsity: float | int | None, nm: Any) -> tuple[float, tuple[int, int] | None]:
    """``(sparsity, nm)`` checked; with ``nm=(N, M)`` the sparsity is ``1 - N/M`` (a given
    ``sparsity`` must agree)."""
    nm = check_nm(nm)
    if nm is None:
        if sparsity is None:
            raise InvalidArgumentError("give sparsity= (fraction of each row's weights to zero, in [0, 1)) or nm=(N, M)")
        return check_sparsity(sparsity), None
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
        raise InvalidArgumentError(f"nm={nm} keeps {nm[0]} of every {nm[1]} weights, i.e. sparsity {implied:g}, "
                                   f"but sparsity={sparsity} was given; pass one of them (or matching values)")
    return implied, nm


def layer_keep_mask(weight: Float[Tensor, "out_features in_features"],
                    sparsity: float) -> Bool[Tensor, "out_features in_features"]:
    """Han et al.'s magnitude pruning of one layer: the ``int(numel * sparsity)`` weights of
    smallest ``|W|`` in the whole matrix are pruned (ties: lower flat index pruned first), so rows
    end up with different sparsities."""
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    n_pruned = int(weight.numel() * sparsity)
    if n_pruned:
        order = magnitude_scores(weight).reshape(-1).argsort(stable=True)
        keep[order[:n_pruned]] = False
    return keep.reshape(weight.shape)


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | int | None = None,
    *,
    calibration: Any = None,
    nm: tuple[int, int] | str | None = None,
    n_calib: int = DEFAULT_N_CALIB,
    seed: int = DEFAULT_CALIB_SEED,
    batch_size: int = 32,
) -> PruningInfo:
    """Prune ``model`` (a dense HookedViT) in place and return what was done, measured.

    Every ``nn.Linear`` inside the blocks (``attn.qkv``, ``attn.proj``, ``mlp.fc1`` or a gated MLP's
    ``fc1_g``/``fc1_x``, ``mlp.fc2``)
    is pruned: ``wanda`` and ``magnitude_row`` per output row (the ``int(in_features * sparsity)``
    lowest-scoring weights of each row become exactly zero), ``magnitude`` per layer (Han et al.:
    the ``int(numel * sparsity)`` smallest ``|W|`` of the matrix, :func:`layer_keep_mask`); with
    ``nm=(N, M)`` every method keeps the N highest-scoring of every M consecutive weights of a row
    (sparsity ``1 - N/M``). The patch embedding and head are kept.

    ``method="wanda"`` scores ``|W_ij| * ||X_j||_2``, with ``||X_j||`` the L2 norm of input feature
    j over every token of every calibration image, gathered from the dense model in one forward
    pass; ``method="magnitude"``/``"magnitude_row"`` score ``|W_ij|`` and need no calibration.

    ``calibration`` (Wanda): an image tensor ``[n, channel, height, width]`` (used whole), a
    dataset from :mod:`hooked_vit.data` or its name, or an image folder; datasets and folders are
    sampled to ``n_calib`` images with ``seed``. ``None`` uses the train split of the model's
    builtin dataset. Masks are stored as ``weight_mask`` buffers and the result as
    ``model.pruning_info``.
    """
    method = check_method(method)
    sparsity, nm = resolve_sparsity(sparsity, nm)
    if is_pruned(model):
        raise InvalidArgumentError("model is already pruned (it has weight_mask buffers); prune a dense model, or call "
                                   "hooked_vit.pruning.remove_masks(model) first to prune its current weights further")
    layers = prunable_layers(model)
    if nm is not None:
        for layer in layers:
            check_nm_fits(nm, layer.in_features, layer.name)
    start = time.perf_counter()
    norms, n_tokens, identity = None, None, None
    if method == "wanda" and sparsity > 0:
        source = resolve_calibration(model, calibration, n=n_calib, seed=seed)
        norms, n_tokens = input_norms(model, source.images, batch_size=batch_size)
        identity = source.identity
    for layer in layers:
        weight = layer.module.weight
        if method == "magnitude" and nm is None:
            set_mask(layer.module, layer_keep_mask(weight, sparsity))
            continue
        keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        for rows in torch.arange(weight.shape[0]).split(ROW_CHUNK):  # bounds the fp64/int64 temporaries
            chunk = weight[rows[0]:rows[-1] + 1]
            scores = magnitude_scores(chunk) if norms is None else wanda_scores(chunk, norms[layer.name])
            keep[rows[0]:rows[-1] + 1] = keep_mask(scores, sparsity, nm, layer=layer.name)
        set_mask(layer.module, keep)
    per_layer, overall = measured_sparsity(model)
    info = PruningInfo(method=method, sparsity=sparsity, nm=nm, calibration=identity,
                       n_calibration_tokens=n_tokens, layer_sparsity=per_layer, overall_sparsity=overall,
                       seconds=time.perf_counter() - start)
    setattr(model, INFO_ATTR, info)
    return info
