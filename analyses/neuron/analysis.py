"""The neuron level's computation for one model (IMPACT sec. 3.2 and 4.2): per class and block, the
top-K units by attribution patching and the four metrics over them (:class:`ModelAnalysis`).

Neurons. The units of the neuron level are the MLP neurons of a block (site ``mlp_act``, the GELU
outputs ``blocks.L.mlp.hook_post``, one unit per feature) and its attention heads treated as single
units (``attn_head``: the head output ``blocks.L.attn.hook_z``, activation = L2 norm over
``d_head``, appendix A.2). Both compete for the top-K of a block (``sites`` changes the set).

Per class ``c`` (its images in ``split``) and block ``L`` (default: early/middle/late,
:func:`default_blocks`):

1. selection: attribution patching (:mod:`analyses.common.attribution_patching`) estimates, per image,
   how much mean-ablating each unit changes the logit of ``c``; a unit's score is the estimated
   *drop* averaged over the class images (``selection="drop"``: the K units whose ablation is
   estimated to lower the class logit most), or the mean absolute estimated change
   (``selection="absolute"``). The top-K scores are chosen (ties: lower unit index first).
2. ablation impact (eq. 2): the K units mean-ablated together, ``normalized_logit_change``
   averaged over the class images;
3. selectivity (eq. 3), class variance (eqs. 4-5) and label entropy (eqs. 6-7) of each of the K
   units (:mod:`analyses.common.metrics`, over all images of ``split``), averaged over the K.

Means come from ``means_split`` (default train, the "training distribution" of eq. 11), kept in
``<out>/means``. One class of one model is one unit of work (``<out>/sparsity_<s>/classes/<c>.json``),
saved as soon as it is known and reused by a rerun with the same settings (the driver,
:func:`analyses.common.level.run_level`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from analyses.common.ablation import ActivationMeans, mean_ablation_hooks, resolve_site
from analyses.common.metrics import (
    average_ranks,
    class_variance,
    label_entropy,
    normalized_logit_change,
    readout_and_patch_max,
    readout_hooks,
    selectivity_from_ranks,
    top_units,
)
from analyses.common.attribution_patching import attribution_patching
from analyses.neuron.config import NEURON_SITES, NeuronConfig
from hooked_vit.data import LabelledImages, default_batch_size, make_loader, progress
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.sites import Site


def default_blocks(n_layers: int) -> tuple[int, ...]:
    """Early, middle and late blocks: ``round((d-1)*2/11)``, ``round((d-1)*7/11)`` and ``d-1``
    (halves rounded up), the paper's blocks 2, 7 and 11 of 12 at ``d = 12``; duplicates dropped for
    very shallow models (``d = 4``: 1, 2, 3)."""
    if n_layers < 1:
        raise InvalidArgumentError(f"a model needs at least one block, got {n_layers}")
    picks = [math.floor((n_layers - 1) * f / 11 + 0.5) for f in (2, 7)] + [n_layers - 1]
    return tuple(dict.fromkeys(picks))


def resolve_blocks(model: nn.Module, blocks: Sequence[int] | None) -> tuple[int, ...]:
    """``blocks`` checked against the model's depth (negative indices count from the end)."""
    n = model.cfg.n_layers
    if blocks is None:
        return default_blocks(n)
    out = []
    for block in blocks:
        if not -n <= int(block) < n:
            raise InvalidArgumentError(f"block {block} out of range for a model with {n} blocks (0..{n - 1})")
        out.append(int(block) % n)
    if not out:
        raise InvalidArgumentError("blocks must name at least one block")
    return tuple(dict.fromkeys(out))


def neuron_sites(model: nn.Module, block: int, names: Sequence[str] = NEURON_SITES) -> list[Site]:
    """The sites whose units are the neuron level's units at ``block`` (in ``names`` order)."""
    return [resolve_site(model, (block, name)) for name in names]


def unit_labels(sites: Sequence[Site]) -> list[str]:
    """``"<site>:<index>"`` for every unit of ``sites``, in concatenation order."""
    return [f"{site.name}:{i}" for site in sites for i in range(site.width)]


# ----------------------------------------------------------------------------- activations
@dataclass
class ActivationTables:
    """Per image of a dataset: the clean ``logits`` ``[n_images n_classes]`` and, per block, each
    neuron unit's CLS-token (readout) activation and its max over the patch tokens (``[n_images n_units]``,
    units in :func:`unit_labels` order; heads as L2 norms over ``d_head``)."""

    logits: Tensor
    labels: Tensor
    cls: dict[int, Tensor]
    max: dict[int, Tensor]


@torch.no_grad()
def activation_tables(
    model: nn.Module,
    dataset: LabelledImages,
    sites: dict[int, list[Site]],
    *,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> ActivationTables:
    """One streaming pass over ``dataset`` filling :class:`ActivationTables` for ``sites`` (block
    -> sites); tables are kept on the CPU. The "CLS" activation is the model's readout
    (:func:`~analyses.common.metrics.readout_and_patch_max`: the attention pool's weighting of the
    patch tokens for an attention-pooled model, whose units then wait for the pool's pattern)."""
    param = next(model.parameters())
    batch_cls: dict[str, list[Tensor]] = {}
    batch_max: dict[str, list[Tensor]] = {}
    by_hook = {site.hook_name: site for block_sites in sites.values() for site in block_sites}
    needs_pattern = bool(readout_hooks(model))
    waiting: dict[str, Tensor] = {}  # this batch's units until the pool pattern is known

    def reduce(name: str, units: Tensor, pool_pattern: Tensor | None) -> None:
        readout, patch_max = readout_and_patch_max(units, model.cfg, pool_pattern)
        batch_cls.setdefault(name, []).append(readout.float().cpu())
        batch_max.setdefault(name, []).append(patch_max.float().cpu())

    def record(act: Tensor, hook) -> None:
        units = by_hook[hook.name].unit_activation(act)  # [batch pos width]
        if needs_pattern:
            waiting[hook.name] = units
        else:
            reduce(hook.name, units, None)

    def pool(pattern: Tensor, hook) -> None:
        for name, units in waiting.items():
            reduce(name, units, pattern)
        waiting.clear()

    logits, labels = [], []
    loader = make_loader(dataset, batch_size=batch_size, device=param.device)
    hooks = [(name, record) for name in by_hook] + [(name, pool) for name in readout_hooks(model)]
    with model.hooks(fwd_hooks=hooks):
        for images, batch_labels in progress(loader, desc="unit activations", total=len(loader),
                                             enabled=show_progress):
            logits.append(model(images.to(device=param.device, dtype=param.dtype)).float().cpu())
            labels.append(batch_labels)
    cls = {b: torch.cat([torch.cat(batch_cls[s.hook_name]) for s in ss], dim=1) for b, ss in sites.items()}
    mx = {b: torch.cat([torch.cat(batch_max[s.hook_name]) for s in ss], dim=1) for b, ss in sites.items()}
    return ActivationTables(torch.cat(logits), torch.cat(labels), cls, mx)


def selection_scores(
    model: nn.Module,
    images: Float[Tensor, "n channel height width"],
    target: int,
    sites: Sequence[Site],
    means: ActivationMeans,
    *,
    selection: str = "drop",
    pooled: bool = False,
    batch_size: int = 64,
) -> Float[Tensor, "n_units"]:
    """Per unit of ``sites`` (concatenated), the selection score from attribution patching with
    mean references and the ``target`` logit as metric: mean estimated drop (``"drop"``) or mean
    absolute estimated change (``"absolute"``) over ``images``, in logits."""
    total: Tensor | None = None
    for start in range(0, images.shape[0], batch_size):
        estimates = attribution_patching(model, images[start:start + batch_size], sites, targets=target,
                                         reference="mean", means=means, pooled=pooled).estimates
        per_image = torch.cat([estimates[s.hook_name] for s in sites], dim=1)  # [batch n_units]
        per_image = -per_image if selection == "drop" else per_image.abs()
        total = per_image.sum(0) if total is None else total + per_image.sum(0)
    assert total is not None
    return (total / images.shape[0]).double().cpu()


# ----------------------------------------------------------------------------- one model
class ModelAnalysis:
    """The per-model state of the neuron level (means, activation tables, label entropies) and the
    per-class computation."""

    def __init__(self, model: nn.Module, dataset: LabelledImages, means: ActivationMeans,
                 config: NeuronConfig, *, show_progress: bool):
        self.model, self.dataset, self.config = model, dataset, config
        self.blocks = resolve_blocks(model, config.blocks)
        self.sites = {b: neuron_sites(model, b, config.sites) for b in self.blocks}
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.means = means.to(self.device, self.dtype)
        self.batch_size = config.batch_size or default_batch_size(self.device)
        self.tables = activation_tables(model, dataset, self.sites, batch_size=self.batch_size,
                                        show_progress=show_progress)
        n_classes = dataset.num_classes
        self.entropy = {b: label_entropy(self.tables.max[b], self.tables.labels, n_classes, config.negatives)
                        for b in self.blocks}
        # CLS-activation ranks over all images: class-independent, so one sort serves every class.
        self.ranks = {b: self._ranks(self.tables.cls[b]) for b in self.blocks}

    def _ranks(self, table: Tensor, chunk: int = 512) -> Tensor:
        """:func:`average_ranks` of a CPU table, computed on the model's device ``chunk`` units at a time."""
        return torch.cat([average_ranks(table[:, i:i + chunk].to(self.device)).cpu()
                          for i in range(0, table.shape[1], chunk)], dim=1)

    def _ablation(self, images: Float[Tensor, "n channel height width"], clean_logits: Float[Tensor, "n n_classes"],
                  units: dict[Site, list[int]], target: int) -> Float[Tensor, "n"]:
        """Eq. 2 per image: the normalised class-logit change when ``units`` are mean-ablated together."""
        hooks = mean_ablation_hooks(self.model, units, self.means, pooled=self.config.pooled_means)
        with torch.no_grad():
            ablated = torch.cat([
                self.model.run_with_hooks(images[i:i + self.batch_size], fwd_hooks=hooks).float().cpu()
                for i in range(0, images.shape[0], self.batch_size)
            ])
        return normalized_logit_change(clean_logits, ablated, target)

    def class_record(self, target: int) -> dict[str, Any]:
        """All numbers of class ``target``: per block the four metrics (averaged over the top-K
        units), the units, their scores, their per-unit metric values and ``by_type``: the same
        metrics over the top-K's members of each site (unit type: MLP neurons, heads)."""
        config, labels = self.config, self.tables.labels
        is_target = labels == target
        n_images = int(is_target.sum())
        if n_images == 0:
            raise InvalidArgumentError(f"class {target} has no images in {self.dataset!r}")
        images = self.dataset.subset(torch.nonzero(is_target).reshape(-1)).tensors(show_progress=False)[0]
        images = images.to(device=self.device, dtype=self.dtype)
        all_sites = [s for b in self.blocks for s in self.sites[b]]
        scores_all = selection_scores(self.model, images, target, all_sites, self.means,
                                      selection=config.selection, pooled=config.pooled_means,
                                      batch_size=self.batch_size)
        clean_logits = self.tables.logits[is_target]
        blocks: dict[str, Any] = {}
        offset = 0
        for b in self.blocks:
            sites = self.sites[b]
            width = sum(s.width for s in sites)
            scores = scores_all[offset:offset + width]
            offset += width
            chosen = top_units(scores, config.top_k)
            units: dict[Site, list[int]] = {}
            start = 0
            for site in sites:
                in_site = chosen[(chosen >= start) & (chosen < start + site.width)] - start
                if in_site.numel():
                    units[site] = in_site.tolist()
                start += site.width
            ablation = self._ablation(images, clean_logits, units, target)
            sel = selectivity_from_ranks(self.ranks[b][:, chosen], labels, target)
            cv = class_variance(self.tables.max[b][:, chosen], labels, target, config.negatives)
            entropy = self.entropy[b][chosen]
            names = unit_labels(sites)
            # The joint top-K split by unit type (the paper compares heads with MLP neurons): per-unit
            # metrics averaged over that type's members; ablation impact of ablating only them.
            by_type: dict[str, Any] = {}
            start = 0
            for site in sites:
                member = (chosen >= start) & (chosen < start + site.width)
                start += site.width
                n_units = int(member.sum())
                alone = ablation if n_units == chosen.numel() else (
                    self._ablation(images, clean_logits, {site: units[site]}, target) if n_units else None)
                by_type[site.name] = {
                    "n_units": n_units,
                    "ablation": None if alone is None else float(alone.mean()),
                    **{metric: float(values[member].mean()) if n_units else None for metric, values in
                       (("selectivity", sel), ("class_variance", cv), ("label_entropy", entropy))},
                }
            blocks[str(b)] = {
                "ablation": float(ablation.mean()),
                "selectivity": float(sel.mean()),
                "class_variance": float(cv.mean()),
                "label_entropy": float(entropy.mean()),
                "units": [names[i] for i in chosen.tolist()],
                "scores": scores[chosen].tolist(),
                "unit_selectivity": sel.tolist(),
                "unit_class_variance": cv.tolist(),
                "unit_label_entropy": entropy.tolist(),
                "by_type": by_type,
            }
        return {"class": target, "class_name": self.dataset.class_names[target], "n_images": n_images,
                "blocks": blocks}


__all__ = ["ActivationTables", "ModelAnalysis", "activation_tables", "default_blocks", "neuron_sites", "resolve_blocks",
           "selection_scores", "unit_labels"]
