"""Attribution patching: the first-order estimate of a metric's change when units are patched.

For a per-image metric ``M`` (default: the target-class logit) and a unit ``u`` at a site with
activation ``a`` (``[batch pos *unit_dims]``), replacing ``a_u`` by a reference ``a_ref`` changes
``M`` by approximately::

    delta_M(u) ~= sum over positions and the unit's dims of (a_ref - a) * dM/da

(Nanda, "Attribution patching"). One forward and one backward pass give the estimate for every unit
of every requested site at once, per image. References: the dataset mean (``"mean"``, see
:class:`~analyses.common.ablation.ActivationMeans`), ``"zero"``, or a corrupted run's activations
(``"corrupted"``, with ``corrupted_images``). Units are features at feature sites and heads at
q/k/v and at :func:`~analyses.common.ablation.attention_head_site` (``attn.hook_z``).

:func:`exact_patching` is the reference it approximates: one patched forward pass per unit
(several units batched into one pass), ``M(patched) - M(clean)``.

Images are independent in a ViT in eval mode (no batch statistics), so the gradient of the summed
metric with respect to image ``i``'s activation is that of ``M(x_i)``: per-image estimates come
from a single backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.common.ablation import ActivationMeans, ablate, resolve_site, site_reference
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.sites import Site

Metric = Callable[[Tensor], Tensor]  # logits [batch n_classes] -> per-image metric [batch]
REFERENCES: tuple[str, ...] = ("mean", "zero", "corrupted")
SiteSpec = Site | str | tuple[int, str]


def logit_metric(targets: int | Int[Tensor, "batch"]) -> Metric:
    """The metric "logit of the target class": ``logits [batch n_classes] -> [batch]``, with one
    target for all images or one per image."""

    def metric(logits: Tensor) -> Tensor:
        if isinstance(targets, int):
            return logits[:, targets]
        return logits.gather(1, targets.to(logits.device).reshape(-1, 1)).squeeze(1)

    return metric


def sum_over_unit(site: Site, values: Float[Tensor, "batch *dims"]) -> Float[Tensor, "batch _width"]:
    """Sum of per-element values over every dimension but the batch and the unit one (positions,
    and ``d_head`` at head units): one number per image and unit (``[batch width]``). Works for
    activations without a position axis too (e.g. ``hook_pooled`` ``[batch d_model]``)."""
    unit_dim = values.ndim - len(site.mask_shape)
    inner = list(range(unit_dim + 1, values.ndim))
    summed = values.sum(dim=inner) if inner else values
    return summed.sum(dim=list(range(1, unit_dim))) if unit_dim > 1 else summed


class Attributions(NamedTuple):
    """Output of :func:`attribution_patching`: ``estimates[hook name]`` is ``[batch width]``, the
    estimated metric change per image and unit (in the metric's units, e.g. logits);
    ``metric`` ``[batch]`` and ``logits`` ``[batch n_classes]`` are the clean run's."""

    estimates: dict[str, Tensor]
    metric: Tensor
    logits: Tensor


def _references(
    model: nn.Module,
    sites: Sequence[Site],
    reference: str,
    means: ActivationMeans | None,
    corrupted_images: Tensor | None,
    batch: int,
    pooled: bool,
) -> dict[str, Tensor]:
    if reference == "corrupted":
        if corrupted_images is None:
            raise InvalidArgumentError("reference='corrupted' needs corrupted_images= (same shape as images)")
        if corrupted_images.shape[0] != batch:
            raise InvalidArgumentError(f"corrupted_images has {corrupted_images.shape[0]} images, the clean batch {batch}")
        refs: dict[str, Tensor] = {}

        def save(act: Tensor, hook) -> None:
            refs[hook.name] = act.detach()

        with torch.no_grad():
            model.run_with_hooks(corrupted_images, fwd_hooks=[(s.hook_name, save) for s in sites])
        return refs
    if reference not in ("mean", "zero"):
        raise InvalidArgumentError(f"reference must be one of {REFERENCES}, got {reference!r}")
    return {s.hook_name: site_reference(s, reference, means, pooled=pooled) for s in sites}


def attribution_patching(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    sites: Sequence[SiteSpec],
    *,
    targets: int | Int[Tensor, "batch"] | None = None,
    metric: Metric | None = None,
    reference: str = "mean",
    means: ActivationMeans | None = None,
    corrupted_images: Float[Tensor, "batch channel height width"] | None = None,
    pooled: bool = False,
) -> Attributions:
    """Estimated change of ``metric`` (default: the logit of ``targets``) per image when each unit
    of each of ``sites`` is replaced by its ``reference`` value, from one forward and one backward
    pass: ``((a_ref - a) * dM/da)`` summed over positions and the unit's dims.

    ``sites``: :class:`Site`\\ s, ``(layer, name)`` pairs or hook names (see
    :func:`~analyses.common.ablation.resolve_site`). Parameter gradients are neither computed nor stored.
    """
    if metric is None:
        if targets is None:
            raise InvalidArgumentError("attribution_patching needs targets= (class per image, or one class) or metric=")
        metric = logit_metric(targets)
    resolved = [resolve_site(model, s) for s in sites]
    if not resolved:
        raise InvalidArgumentError("attribution_patching needs at least one site")
    refs = _references(model, resolved, reference, means, corrupted_images, images.shape[0], pooled)
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        acts[hook.name] = act

    with torch.enable_grad(), model.hooks(fwd_hooks=[(s.hook_name, keep) for s in resolved]):
        logits = model(images.detach().requires_grad_(True))
        values = metric(logits)
        if values.shape != (images.shape[0],):
            raise InvalidArgumentError(f"metric must map logits to one value per image, shape [{images.shape[0]}]; "
                                       f"got {list(values.shape)}")
        names = list(dict.fromkeys(s.hook_name for s in resolved))
        grads = dict(zip(names, torch.autograd.grad(values.sum(), [acts[n] for n in names])))
    with torch.no_grad():
        estimates = {}
        for site in resolved:
            act = acts[site.hook_name].detach()
            ref = refs[site.hook_name].to(device=act.device, dtype=act.dtype)
            estimates[site.hook_name] = sum_over_unit(site, (ref - act) * grads[site.hook_name])
    return Attributions(estimates, values.detach(), logits.detach())


@torch.no_grad()
def exact_patching(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    site: SiteSpec,
    *,
    targets: int | Int[Tensor, "batch"] | None = None,
    metric: Metric | None = None,
    reference: str = "mean",
    means: ActivationMeans | None = None,
    corrupted_images: Float[Tensor, "batch channel height width"] | None = None,
    pooled: bool = False,
    units: Sequence[int] | None = None,
    batch_size: int = 256,
) -> Float[Tensor, "batch n_units"]:
    """Exact activation patching: ``M(patched) - M(clean)`` per image for each unit of ``site``
    (all, or ``units``) replaced alone by its reference, one patched run per unit. Units are
    batched: up to ``batch_size // batch`` units (each a copy of the images) share a forward pass."""
    if metric is None:
        if targets is None:
            raise InvalidArgumentError("exact_patching needs targets= or metric=")
        metric = logit_metric(targets)
    site = resolve_site(model, site)
    batch = images.shape[0]
    unit_list = list(range(site.width)) if units is None else [int(u) for u in units]
    ref = _references(model, [site], reference, means, corrupted_images, batch, pooled)[site.hook_name]
    clean = metric(model(images))
    param = next(model.parameters())
    chunk = max(1, batch_size // batch)
    out = []
    for start in range(0, len(unit_list), chunk):
        chunk_units = unit_list[start:start + chunk]
        n = len(chunk_units)
        # One mask per patched copy: copy j has unit chunk_units[j] set to 0.
        mask = torch.ones(n, site.width, device=param.device, dtype=param.dtype)
        mask[torch.arange(n, device=param.device), torch.tensor(chunk_units, device=param.device)] = 0.0
        mask = mask.repeat_interleave(batch, dim=0).reshape(n * batch, *site.mask_shape)
        chunk_ref = ref.repeat(n, *([1] * (ref.ndim - 1))) if reference == "corrupted" else ref

        def patch(act: Tensor, hook, mask: Tensor = mask, chunk_ref: Tensor = chunk_ref) -> Tensor:
            # Per-copy masks broadcast over the axes between batch and unit (positions).
            middle = act.ndim - 1 - len(site.mask_shape)
            return ablate(act, mask.reshape(mask.shape[0], *([1] * middle), *site.mask_shape), chunk_ref)

        logits = model.run_with_hooks(images.repeat(n, 1, 1, 1), fwd_hooks=[(site.hook_name, patch)])
        patched = torch.stack([metric(part) for part in logits.reshape(n, batch, -1)])  # [n, batch]
        out.append(patched - clean)
    return torch.cat(out).T.contiguous()
