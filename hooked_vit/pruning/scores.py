"""Weight importance scores (Wanda, magnitude) and the keep-masks they induce, per output row."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_vit.pruning.validation import check_nm, check_nm_fits, check_sparsity


def wanda_scores(
    weight: Float[Tensor, "out_features in_features"],
    input_norm: Float[Tensor, " in_features"],
) -> Float[Tensor, "out_features in_features"]:
    """Wanda's ``S_ij = |W_ij| * ||X_j||_2`` (float64; ``input_norm`` from
    :func:`~hooked_vit.pruning.statistics.input_norms`)."""
    return weight.detach().abs().to(torch.float64) * input_norm.to(device=weight.device, dtype=torch.float64)


def magnitude_scores(weight: Float[Tensor, "out_features in_features"]) -> Float[Tensor, "out_features in_features"]:
    """Magnitude pruning's ``S_ij = |W_ij|`` (float64)."""
    return weight.detach().abs().to(torch.float64)


def keep_mask(
    scores: Float[Tensor, "out_features in_features"],
    sparsity: float | int,
    nm: tuple[int, int] | None = None,
    *,
    layer: str = "layer",
) -> Bool[Tensor, "out_features in_features"]:
    """``True`` where a weight is kept.

    Unstructured (``nm=None``): in each output row the ``int(in_features * sparsity)`` lowest
    scores are pruned (ties broken by a stable sort, lower input index pruned first).
    N:M (``nm=(N, M)``, ``sparsity`` ignored): in each row, of every M consecutive weights the N
    highest-scoring are kept (ties: lower index kept).
    """
    out_features, in_features = scores.shape
    nm = check_nm(nm)
    if nm is not None:
        n, m = nm
        check_nm_fits(nm, in_features, layer)
        groups = scores.reshape(out_features, in_features // m, m)
        top = groups.argsort(dim=-1, descending=True, stable=True)[..., :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return mask.reshape(out_features, in_features)
    n_pruned = int(in_features * check_sparsity(sparsity))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_pruned:
        order = scores.argsort(dim=1, stable=True)
        mask.scatter_(1, order[:, :n_pruned], False)
    return mask
