"""The four neuron-level metrics of the IMPACT paper (sec. 3.2) as pure tensor functions.

A *unit* is a column of the activation tables: an MLP neuron, an attention head (its L2 norm over
``d_head``), or an SAE latent. Inputs are per image: ``cls_acts`` is the unit's activation at the
CLS token, ``max_acts`` its maximum over the patch tokens (CLS excluded, appendix A.2); both come
from :func:`readout_and_patch_max`. For a model without a class token (SigLIP's attention-pool
head) "the CLS token" is the model's readout: the attention pool's weights over the patch tokens
(mean over its heads); for mean pooling, the mean over the patch tokens. The prefix tokens (CLS,
distillation token, registers) never count as patches.

* :func:`normalized_logit_change` (eq. 2, ablation impact): ``(f_c(x) - f_c^abl(x)) / ||f(x)||_2``.
* :func:`selectivity` (eq. 3): AUROC of the CLS activation as a one-vs-rest score for the target
  (scikit-learn's ``roc_auc_score``; :func:`selectivity_from_ranks` is the same number from one
  ranking shared by all classes, for many classes).
* :func:`class_variance` (eqs. 4-5): coefficient of variation of ``max_acts`` within the target class.
* :func:`label_entropy` (eqs. 6-7): Shannon entropy (nats) of the unit's activation mass over classes.

Negative activations and zero means. Eqs. 4-7 treat activations as non-negative "response
strengths" (the paper's ViT neurons are GELU outputs, its heads L2 norms, its SAE latents ReLU'd).
:func:`response` makes them so, by one of two rules (argument ``negatives``):

* ``"clamp"`` (default): ``max(m, 0)``; a negative activation counts as no response. GELU is
  bounded below by -0.17, so this only changes "off" values; norms and SAE latents are unchanged.
* ``"shift"``: ``m - min(0, min_x m)``, the unit's minimum over all images given (all classes) moved
  to zero; order-preserving, for sites with genuinely signed activations (residual, LayerNorm).

With non-negative responses the formulas are finite except for a unit with zero total response;
those cases are defined, never NaN: class variance of a unit silent on every image of the class
(mean 0) is 0 (it responds identically, with nothing), and the label entropy of a unit silent on
every image is ``log(n_classes)`` (no class preference). Standard deviations are population ones
(``ddof=0``), so a one-image class has CV 0. Selectivity is rank-based and takes raw activations;
a constant unit scores 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from sklearn.metrics import roc_auc_score
from torch import Tensor

from analyses.common.vocabulary import METRIC_LABELS, METRICS, NEGATIVE_RULES  # noqa: F401  (public here too)
from hooked_vit.errors import InvalidArgumentError

NORM_FLOOR = 1e-12
# The attention-pool head's pattern, [batch head 1 n_patches]: the readout weights of a "map" model.
POOL_PATTERN_HOOK = "attn_pool.hook_pattern"


def readout_hooks(model: Any) -> list[str]:
    """Hooks whose values :func:`readout_and_patch_max` needs besides the unit's own: the
    attention-pool pattern for an attention-pooled model, else none."""
    return [POOL_PATTERN_HOOK] if model.cfg.pooling == "map" else []


def readout_and_patch_max(
    units: Float[Tensor, "batch pos width"], cfg: Any, pool_pattern: Float[Tensor, "batch head 1 n_patch"] | None = None
) -> tuple[Float[Tensor, "batch width"], Float[Tensor, "batch width"]]:
    """Per image, each unit's activation where the model reads its prediction (the CLS token for
    token pooling; the mean over the patch tokens for mean pooling; the mean of those two for
    ``token_avg``; for the attention pool, the
    patch tokens weighted by ``pool_pattern`` averaged over its heads) and its maximum over the patch
    tokens (``cfg.n_prefix_tokens`` prefix tokens excluded)."""
    patches = units[:, cfg.n_prefix_tokens:]
    if cfg.pooling == "token":
        readout = units[:, 0]
    elif cfg.pooling == "avg":
        readout = patches.mean(dim=1)
    elif cfg.pooling == "token_avg":  # the head reads the CLS token and the patch mean side by side
        readout = (units[:, 0] + patches.mean(dim=1)) / 2
    else:
        if pool_pattern is None:
            raise InvalidArgumentError("an attention-pooled model's readout needs its pool pattern "
                                       f"({POOL_PATTERN_HOOK}); capture readout_hooks(model) in the same forward")
        weights = pool_pattern.mean(dim=1)[:, 0].to(units.dtype)  # [batch n_patch], sums to 1
        readout = torch.einsum("bp,bpw->bw", weights, patches)
    return readout, patches.amax(dim=1)


def _check_table(acts: Tensor, labels: Tensor, what: str) -> None:
    if acts.shape[0] == 0:
        raise InvalidArgumentError(f"{what}: no images given")
    if not torch.isfinite(acts).all():
        raise InvalidArgumentError(f"{what}: activations contain NaN or inf")
    if labels.numel() and int(labels.min()) < 0:
        raise InvalidArgumentError(f"{what}: labels must be non-negative class indices")


def _target_mask(labels: Int[Tensor, "n"], target: int, what: str) -> Bool[Tensor, "n"]:
    is_target = labels == target
    if not bool(is_target.any()):
        raise InvalidArgumentError(f"{what}: class {target} has no images among the {labels.shape[0]} given")
    return is_target


def response(
    acts: Float[Tensor, "n_images n_units"], negatives: str = "clamp"
) -> Float[Tensor, "n_images n_units"]:
    """Non-negative response strengths from activations (see the module docstring): ``"clamp"``
    zeroes negatives, ``"shift"`` subtracts each unit's minimum over the images when negative."""
    if negatives == "clamp":
        return acts.clamp_min(0.0)
    if negatives == "shift":
        return acts - acts.min(dim=0, keepdim=True).values.clamp_max(0.0)
    raise InvalidArgumentError(f"negatives must be one of {NEGATIVE_RULES}, got {negatives!r}")


def normalized_logit_change(
    clean_logits: Float[Tensor, "batch n_classes"],
    ablated_logits: Float[Tensor, "batch n_classes"],
    target: int,
) -> Float[Tensor, "batch"]:
    """Eq. 2 per image: ``(f_c(x) - f_c^abl(x)) / ||f(x)||_2``, with ``c = target`` and ``f(x)``
    the clean logit vector (L2 norm over all classes, floored at 1e-12). Positive when the
    ablation lowers the target logit; unitless."""
    n_classes = clean_logits.shape[1]
    if not 0 <= target < n_classes:
        raise InvalidArgumentError(f"target class {target} out of range for {n_classes} logits")
    norm = torch.linalg.vector_norm(clean_logits, dim=1).clamp_min(NORM_FLOOR)
    return (clean_logits[:, target] - ablated_logits[:, target]) / norm


def selectivity(
    cls_acts: Float[Tensor, "n_images n_units"], labels: Int[Tensor, "n_images"], target: int
) -> Float[Tensor, "n_units"]:
    """Eq. 3: per unit, the AUROC (scikit-learn's ``roc_auc_score``, ties count 1/2) of the CLS
    activation as a score for "image is of class ``target``" against all other images given.

    1 = perfectly selective, 0.5 = no discrimination (e.g. a constant unit), 0 = perfectly
    anti-selective. Needs at least one image of the target class and one of another class.
    """
    _check_table(cls_acts, labels, "selectivity")
    is_target = _target_mask(labels, target, "selectivity")
    if bool(is_target.all()):
        raise InvalidArgumentError(f"selectivity: every image is of class {target}; AUROC needs images of other classes")
    scores = cls_acts.detach().double().cpu().numpy()
    y_true = is_target.cpu().numpy().astype(np.int64)
    auc = [roc_auc_score(y_true, scores[:, unit]) for unit in range(scores.shape[1])]
    return torch.tensor(auc, dtype=cls_acts.dtype, device=cls_acts.device)


def average_ranks(values: Float[Tensor, "n_images n_units"]) -> Float[Tensor, "n_images n_units"]:
    """Ranks (1 = smallest) of each column's values, ties sharing their average rank: for a value
    ``v``, ``(#{< v} + #{<= v} + 1) / 2``. float32 (exact for up to 2^23 images); computed on the
    input's device (one sort and two binary searches per column, no Python loop)."""
    columns = values.T.contiguous()
    ordered = columns.sort(dim=1).values
    below = torch.searchsorted(ordered, columns, side="left")
    up_to = torch.searchsorted(ordered, columns, side="right")
    return ((below + up_to + 1).float() / 2).T


def selectivity_from_ranks(
    ranks: Float[Tensor, "n_images n_units"], labels: Int[Tensor, "n_images"], target: int
) -> Float[Tensor, "n_units"]:
    """:func:`selectivity` from :func:`average_ranks` of the CLS activations (Mann-Whitney:
    ``(sum of the target images' ranks - n_t (n_t + 1) / 2) / (n_t n_rest)``), equal to scikit-
    learn's AUROC. The ranks do not depend on the class, so one ranking serves every class: the
    fast path for many classes."""
    is_target = _target_mask(labels, target, "selectivity")
    n_pos = int(is_target.sum())
    n_neg = labels.shape[0] - n_pos
    if n_neg == 0:
        raise InvalidArgumentError(f"selectivity: every image is of class {target}; AUROC needs images of other classes")
    rank_sum = ranks[is_target.to(ranks.device)].double().sum(dim=0)
    return ((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).to(ranks.dtype)


def class_variance(
    max_acts: Float[Tensor, "n_images n_units"],
    labels: Int[Tensor, "n_images"],
    target: int,
    negatives: str = "clamp",
) -> Float[Tensor, "n_units"]:
    """Eqs. 4-5: per unit, the coefficient of variation ``std / mean`` (population std) of the
    max-pooled responses over the images of class ``target``. Activations are made non-negative
    first (:func:`response`, over all images given); a unit whose responses on the class are all
    zero gets 0. Lower = more consistent within the class; unitless, in ``[0, sqrt(n_c - 1)]``."""
    _check_table(max_acts, labels, "class_variance")
    is_target = _target_mask(labels, target, "class_variance")
    values = response(max_acts, negatives)[is_target].double()
    mean = values.mean(dim=0)
    std = values.std(dim=0, correction=0)
    cv = torch.where(mean > 0, std / mean.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(mean))
    return cv.to(max_acts.dtype)


def class_distribution(
    max_acts: Float[Tensor, "n_images n_units"],
    labels: Int[Tensor, "n_images"],
    n_classes: int,
    negatives: str = "clamp",
) -> Float[Tensor, "n_classes n_units"]:
    """Eq. 7: ``P_n(c)``, each unit's share of its total max-pooled response that falls on the
    images of class ``c`` (columns sum to 1; uniform for a unit with zero total response)."""
    _check_table(max_acts, labels, "label_entropy")
    if int(labels.max()) >= n_classes:
        raise InvalidArgumentError(f"label_entropy: label {int(labels.max())} out of range for n_classes={n_classes}")
    values = response(max_acts, negatives).double()
    mass = torch.zeros(n_classes, values.shape[1], dtype=torch.float64, device=values.device)
    mass.index_add_(0, labels.to(values.device), values)
    total = mass.sum(dim=0, keepdim=True)
    uniform = torch.full_like(mass, 1.0 / n_classes)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(torch.float64).tiny), uniform).to(max_acts.dtype)


def label_entropy(
    max_acts: Float[Tensor, "n_images n_units"],
    labels: Int[Tensor, "n_images"],
    n_classes: int,
    negatives: str = "clamp",
) -> Float[Tensor, "n_units"]:
    """Eqs. 6-7: per unit, the Shannon entropy (nats) of :func:`class_distribution`, in
    ``[0, log(n_classes)]``. Lower = responds to fewer classes; a unit with zero total response
    gets ``log(n_classes)``. Classes without images contribute nothing (0 log 0 = 0)."""
    p = class_distribution(max_acts, labels, n_classes, negatives).double()
    entropy = -torch.special.xlogy(p, p).sum(dim=0)
    return entropy.clamp(0.0, math.log(n_classes)).to(max_acts.dtype)


def top_units(scores: Float[Tensor, "n_units"], k: int) -> Int[Tensor, "k"]:
    """Indices of the ``k`` largest ``scores``, largest first (ties: lower index first)."""
    if not 1 <= k <= scores.shape[0]:
        raise InvalidArgumentError(f"top_k={k} but the block has {scores.shape[0]} units; choose 1 <= top_k <= {scores.shape[0]}")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:k]


def metric_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Over ``rows`` (one per class, each holding the :data:`METRICS`): ``n_classes`` and each metric's
    mean and population std (``<metric>_mean``, ``<metric>_std``; NaN when there is no row)."""
    out: dict[str, Any] = {"n_classes": len(rows)}
    for metric in METRICS:
        values = torch.tensor([float(r[metric]) for r in rows], dtype=torch.float64)
        out[f"{metric}_mean"] = float(values.mean()) if rows else float("nan")
        out[f"{metric}_std"] = float(values.std(correction=0)) if rows else float("nan")
    return out
