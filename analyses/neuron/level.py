"""Neuron level of IMPACT (sec. 3.2 and 4.2): per class and block, the top-K units by attribution
patching and the four metrics over them, for a dense model and its pruned variants.

Neurons. The units of the neuron level are the MLP neurons of a block (site ``mlp_act``, the GELU
outputs ``blocks.L.mlp.hook_post``, one unit per feature) and its attention heads treated as single
units (``attn_head``: the head output ``blocks.L.attn.hook_z``, activation = L2 norm over
``d_head``, appendix A.2). Both compete for the top-K of a block (``sites`` changes the set).

Per class ``c`` (its images in ``split``) and block ``L`` (default: early/middle/late,
:func:`default_blocks`):

1. selection: attribution patching (:mod:`analyses.neuron.attribution_patching`) estimates, per image,
   how much mean-ablating each unit changes the logit of ``c``; a unit's score is the estimated
   *drop* averaged over the class images (``selection="drop"``: the K units whose ablation is
   estimated to lower the class logit most), or the mean absolute estimated change
   (``selection="absolute"``). The top-K scores are chosen (ties: lower unit index first).
2. ablation impact (eq. 2): the K units mean-ablated together, ``normalized_logit_change``
   averaged over the class images;
3. selectivity (eq. 3), class variance (eqs. 4-5) and label entropy (eqs. 6-7) of each of the K
   units (:mod:`analyses.neuron.metrics`, over all images of ``split``), averaged over the K.

Means come from ``means_split`` (default train, the "training distribution" of eq. 11). One
class's numbers are written to ``<out>/sparsity_<s>/classes/<c>.json`` as soon as they are known,
with the settings that produced them; a rerun skips the classes already done (resume).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.common.ablation import (
    ALL_SITE_NAMES,
    HEAD_SITE,
    ActivationMeans,
    load_or_compute_means,
    mean_ablation_hooks,
    model_key,
    resolve_site,
)
from analyses.neuron.attribution_patching import attribution_patching
from analyses.neuron.metrics import (
    NEGATIVE_RULES,
    average_ranks,
    class_variance,
    label_entropy,
    normalized_logit_change,
    selectivity_from_ranks,
)
from analyses.neuron.cli import add_arguments
from analyses.common.defaults import DEFAULT_MODEL, DEFAULT_SPARSITIES  # noqa: F401  (public here)
from analyses.common.variants import ModelFamily, load_model, sparsity_dir
from analyses.common.results import AnalysisResult, markdown_table, settings_without
from analyses.common.units import Shard, load_unit, save_unit
from hooked_vit import atomic
from hooked_vit.data import (
    LabelledImages,
    calibration_sample,
    default_batch_size,
    load_dataset,
    make_loader,
    progress,
)
from hooked_vit.cli_args import parse_classes, parse_numbers
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.sites import Site

NEURON_SITES: tuple[str, ...] = ("mlp_act", HEAD_SITE)
METRICS: tuple[str, ...] = ("ablation", "selectivity", "class_variance", "label_entropy")
METRIC_LABELS = {"ablation": "Ablation impact", "selectivity": "Selectivity (AUROC)",
                 "class_variance": "Class variance (CV)", "label_entropy": "Label entropy (nats)"}
SELECTIONS: tuple[str, ...] = ("drop", "absolute")
# Settings that do not change a class's numbers (so a resumed run may differ in them).
_RUN_ONLY = ("sparsities", "classes", "batch_size", "device")


@dataclass
class NeuronLevelConfig(ModelFamily):
    """Settings of a neuron-level run.

    ``model``: alias for :meth:`HookedViT.from_pretrained`, pruned with ``method`` at each of
    ``sparsities`` (0 = dense; ``finetune_epochs`` of masked fine-tuning after pruning, Wanda
    calibrated on ``n_calib`` train images of ``dataset`` drawn by ``calib_sampling``; ``None``: the
    model preset's protocol, see :func:`analyses.common.variants.variant_settings`).
    ``dataset``: source for :func:`hooked_vit.data.load_dataset` (``"builtin"``: the model's own);
    ``split`` holds the analysed images, ``means_split`` those the ablation means are taken over.
    ``classes``: indices, ids or names (default: every class present in ``split``). ``blocks``:
    default :func:`default_blocks`. ``top_k`` units per class and block among ``sites``, chosen by
    ``selection`` (``"drop"`` or ``"absolute"``). ``negatives``: the rule of
    :mod:`analyses.neuron.metrics` for negative activations. ``pooled_means``: ablate with the mean
    over images and positions instead of the per-position mean. ``n_means_images``: take the means
    over a class-balanced sample of that many ``means_split`` images drawn with ``seed`` (default:
    all of them; e.g. 50,000 for ImageNet's train split).
    """

    split: str = "val"
    means_split: str = "train"
    classes: tuple[int | str, ...] | None = None
    blocks: tuple[int, ...] | None = None
    top_k: int = 50
    sites: tuple[str, ...] = NEURON_SITES
    selection: str = "drop"
    negatives: str = "clamp"
    pooled_means: bool = False
    n_means_images: int | None = None
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise InvalidArgumentError(f"top_k must be >= 1, got {self.top_k}")
        if self.selection not in SELECTIONS:
            raise InvalidArgumentError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.negatives not in NEGATIVE_RULES:
            raise InvalidArgumentError(f"negatives must be one of {NEGATIVE_RULES}, got {self.negatives!r}")
        unknown = [s for s in self.sites if s not in ALL_SITE_NAMES]
        if unknown or not self.sites:
            raise InvalidArgumentError(f"sites must be a non-empty subset of {list(ALL_SITE_NAMES)}, got {list(self.sites)}")

    def class_settings(self) -> dict[str, Any]:
        """What one class's numbers depend on (besides the model's weights and the class)."""
        return settings_without(self, _RUN_ONLY)


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
    neuron unit's CLS-token activation and its max over the patch tokens (``[n_images n_units]``,
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
    -> sites); tables are kept on the CPU."""
    param = next(model.parameters())
    batch_cls: dict[str, list[Tensor]] = {}
    batch_max: dict[str, list[Tensor]] = {}
    by_hook = {site.hook_name: site for block_sites in sites.values() for site in block_sites}

    def record(act: Tensor, hook) -> None:
        units = by_hook[hook.name].unit_activation(act)  # [batch pos width]
        batch_cls.setdefault(hook.name, []).append(units[:, 0].float().cpu())
        batch_max.setdefault(hook.name, []).append(units[:, 1:].amax(dim=1).float().cpu())

    logits, labels = [], []
    loader = make_loader(dataset, batch_size=batch_size, device=param.device)
    with model.hooks(fwd_hooks=[(name, record) for name in by_hook]):
        for images, batch_labels in progress(loader, desc="unit activations", total=len(loader),
                                             enabled=show_progress):
            logits.append(model(images.to(device=param.device, dtype=param.dtype)).float().cpu())
            labels.append(batch_labels)
    cls = {b: torch.cat([torch.cat(batch_cls[s.hook_name]) for s in ss], dim=1) for b, ss in sites.items()}
    mx = {b: torch.cat([torch.cat(batch_max[s.hook_name]) for s in ss], dim=1) for b, ss in sites.items()}
    return ActivationTables(torch.cat(logits), torch.cat(labels), cls, mx)


def top_units(scores: Float[Tensor, "n_units"], k: int) -> Int[Tensor, "k"]:
    """Indices of the ``k`` largest ``scores``, largest first (ties: lower index first)."""
    if not 1 <= k <= scores.shape[0]:
        raise InvalidArgumentError(f"top_k={k} but the block has {scores.shape[0]} units; choose 1 <= top_k <= {scores.shape[0]}")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:k]


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
class _ModelAnalysis:
    """The per-model state of the neuron level (means, activation tables, label entropies) and the
    per-class computation."""

    def __init__(self, model: nn.Module, dataset: LabelledImages, means: ActivationMeans,
                 config: NeuronLevelConfig, *, show_progress: bool):
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


def _class_path(directory: Path, target: int) -> Path:
    return directory / "classes" / f"{target}.json"


def resolve_classes(dataset: LabelledImages, classes: Sequence[int | str] | None) -> list[int]:
    """Class indices to analyse: ``classes`` (indices, ids or names; each needs images in
    ``dataset``), default every class present."""
    if len(dataset) == 0:
        raise InvalidArgumentError(f"{dataset!r} has no images to analyse")
    if classes is None:
        return dataset.present_classes()
    present = set(dataset.present_classes())
    out = []
    for c in classes:
        index = dataset.class_index(c)
        if index not in present:
            raise InvalidArgumentError(f"class {c!r} ({dataset.class_names[index]}) has no images in {dataset!r}; "
                                       f"classes with images: {sorted(present)}")
        out.append(index)
    if not out:
        raise InvalidArgumentError("classes must name at least one class")
    return list(dict.fromkeys(out))


def model_records(
    model: nn.Module,
    dataset: LabelledImages,
    means_dataset: LabelledImages,
    config: NeuronLevelConfig,
    *,
    directory: str | os.PathLike | None = None,
    means_directory: str | os.PathLike | None = None,
    only: Sequence[int] | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Per-class records (:meth:`_ModelAnalysis.class_record`) of one model, in class order (of
    the class indices ``only``, if given: a shard's share). With ``directory``, each record is
    saved there as soon as it is computed and records already saved with the same settings and
    weights are reused (resume)."""
    classes = resolve_classes(dataset, config.classes) if only is None else list(only)
    for block in resolve_blocks(model, config.blocks):  # fail early on a top-K larger than a block
        top_units(torch.zeros(sum(s.width for s in neuron_sites(model, block, config.sites))), config.top_k)
    settings = {**config.class_settings(), "model_key": model_key(model), "dataset": dataset.name,
                "split": dataset.split, "n_images": len(dataset), "means_dataset": means_dataset.name,
                "means_split": means_dataset.split}
    records: dict[int, dict[str, Any]] = {}
    if directory is not None:
        for c in classes:
            saved = load_unit(_class_path(Path(directory), c), settings, "a per-class neuron-level record (JSON)")
            if saved is not None:
                records[c] = saved
    pending = [c for c in classes if c not in records]
    if pending:
        means = load_or_compute_means(model, means_dataset, directory=means_directory,
                                      batch_size=config.batch_size, show_progress=show_progress)
        analysis = _ModelAnalysis(model, dataset, means, config, show_progress=show_progress)
        for c in progress(pending, desc="classes", total=len(pending), enabled=show_progress):
            records[c] = analysis.class_record(c)
            if directory is not None:
                save_unit(_class_path(Path(directory), c), settings, records[c])
    return [records[c] for c in classes]


# ----------------------------------------------------------------------------- result
def flatten_records(sparsity: float, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (class, block): sparsity, block, class, class_name, n_images and the metrics."""
    return [{"sparsity": float(sparsity), "block": int(b), "class": r["class"], "class_name": r["class_name"],
             "n_images": r["n_images"], **{m: values[m] for m in METRICS}}
            for r in records for b, values in r["blocks"].items()]


def flatten_type_records(sparsity: float, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (class, block, unit type) of the joint top-K: ``n_units`` of that type and the
    metrics over them (``None`` when the type has no unit in the top-K)."""
    return [{"sparsity": float(sparsity), "block": int(b), "class": r["class"], "unit_type": site,
             **{key: values[key] for key in ("n_units", *METRICS)}}
            for r in records for b, block in r["blocks"].items() for site, values in block.get("by_type", {}).items()]


UNIT_TYPE_LABELS = {"mlp_act": "MLP neurons", "attn_head": "heads"}


@dataclass
class NeuronLevelResult(AnalysisResult):
    """Neuron-level metrics: ``rows`` has one entry per (sparsity, class, block) with the four
    metrics averaged over that class and block's top-K units (see :func:`flatten_records`);
    ``model_keys`` maps each sparsity (as a string) to the weights it was measured on;
    ``type_rows`` the same metrics per unit type of the joint top-K (:func:`flatten_type_records`)."""

    CONFIG_CLASS: ClassVar[type] = NeuronLevelConfig
    config: NeuronLevelConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    type_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def blocks(self) -> list[int]:
        return sorted({r["block"] for r in self.rows})

    @property
    def sparsities(self) -> list[float]:
        return sorted({r["sparsity"] for r in self.rows})

    def values(self, metric: str, block: int, sparsity: float) -> list[float]:
        """Per-class values of ``metric`` at ``block`` and ``sparsity``."""
        if metric not in METRICS:
            raise InvalidArgumentError(f"unknown metric {metric!r}; metrics are {METRICS}")
        return [r[metric] for r in self.rows if r["block"] == block and r["sparsity"] == sparsity]

    def summary(self) -> list[dict[str, Any]]:
        """Per block and sparsity: number of classes and mean/std (population) of each metric."""
        out = []
        for block in self.blocks:
            for sparsity in self.sparsities:
                row: dict[str, Any] = {"block": block, "sparsity": sparsity}
                for metric in METRICS:
                    values = torch.tensor(self.values(metric, block, sparsity), dtype=torch.float64)
                    row["n_classes"] = values.numel()
                    row[f"{metric}_mean"] = float(values.mean())
                    row[f"{metric}_std"] = float(values.std(correction=0))
                out.append(row)
        return out

    def summary_by_type(self) -> list[dict[str, Any]]:
        """Per block, sparsity and unit type: the classes whose top-K holds units of that type, their
        mean number of such units, and mean/std (population, over those classes) of each metric."""
        out = []
        keys = dict.fromkeys((r["block"], r["sparsity"], r["unit_type"]) for r in self.type_rows)
        for block, sparsity, unit_type in sorted(keys):
            rows = [r for r in self.type_rows if (r["block"], r["sparsity"], r["unit_type"]) == (block, sparsity, unit_type)]
            present = [r for r in rows if r["n_units"]]
            row: dict[str, Any] = {"block": block, "sparsity": sparsity, "unit_type": unit_type,
                                   "n_classes": len(present),
                                   "n_units_mean": sum(r["n_units"] for r in rows) / len(rows)}
            for metric in METRICS:
                values = torch.tensor([r[metric] for r in present], dtype=torch.float64)
                row[f"{metric}_mean"] = float(values.mean()) if present else float("nan")
                row[f"{metric}_std"] = float(values.std(correction=0)) if present else float("nan")
            out.append(row)
        return out

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"per_class": self.rows, "summary": self.summary(), "per_type": self.type_rows,
                "summary_by_type": self.summary_by_type()}

    def markdown(self) -> str:
        """The summary as a markdown table (mean ± std over classes), then the same per unit type."""
        rows = [{"block": r["block"], "sparsity": "dense" if r["sparsity"] == 0 else f"{r['sparsity']:g}",
                 "classes": r["n_classes"],
                 **{METRIC_LABELS[m]: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS}}
                for r in self.summary()]
        text = markdown_table(rows)
        if self.type_rows:
            rows = [{"block": r["block"], "sparsity": "dense" if r["sparsity"] == 0 else f"{r['sparsity']:g}",
                     "units": UNIT_TYPE_LABELS.get(r["unit_type"], r["unit_type"]),
                     "of top-K (mean)": f"{r['n_units_mean']:.1f}", "classes": r["n_classes"],
                     **{METRIC_LABELS[m]: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS}}
                    for r in self.summary_by_type()]
            text += "\n\nThe same top-K split by unit type (ablation impact: only that type's units ablated):\n\n"
            text += markdown_table(rows)
        return text

    def save(self, directory: str | os.PathLike) -> Path:
        """``result.json``, ``per_class.csv``, ``summary.csv``, ``summary.md`` and ``figure.png``."""
        directory = super().save(directory)
        atomic.write_text(directory / "summary.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        self.plot(directory / "figure.png")
        return directory

    def plot(self, path: str | os.PathLike | None = None):
        """The paper's Figure 2: violins of the per-class values, metrics (rows) x blocks
        (columns), one colour per sparsity. Saved to ``path`` (PNG) if given; returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        blocks, sparsities = self.blocks, self.sparsities
        colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.9, max(len(sparsities), 1)).tolist())
        fig, axes = plt.subplots(len(METRICS), len(blocks), figsize=(3.2 * len(blocks) + 1, 2.4 * len(METRICS)),
                                 squeeze=False, sharey="row")
        for i, metric in enumerate(METRICS):
            for j, block in enumerate(blocks):
                ax = axes[i][j]
                for x, (sparsity, colour) in enumerate(zip(sparsities, colours)):
                    values = self.values(metric, block, sparsity)
                    if len(values) >= 2 and max(values) - min(values) > 1e-12:
                        parts = ax.violinplot([values], positions=[x], widths=0.8, showmeans=True)
                        for body in parts["bodies"]:
                            body.set_facecolor(colour)
                            body.set_alpha(0.7)
                        for key in ("cmeans", "cmins", "cmaxes", "cbars"):
                            parts[key].set_color(colour)
                    elif values:  # a single value or all equal: a KDE is undefined, draw the points
                        ax.scatter([x] * len(values), values, color=colour, s=12)
                ax.set_xticks(range(len(sparsities)), ["dense" if s == 0 else f"{s:g}" for s in sparsities])
                ax.grid(alpha=0.3, axis="y")
                if i == 0:
                    ax.set_title(f"block {block}")
                if j == 0:
                    ax.set_ylabel(METRIC_LABELS[metric])
                if i == len(METRICS) - 1:
                    ax.set_xlabel("sparsity")
        config = self.config
        fig.suptitle(f"Neuron level: {config.model}, {config.method}, top-{config.top_k} "
                     f"{'+'.join(config.sites)} units per class ({config.split} split)")
        fig.tight_layout()
        if path is not None:
            atomic.save_figure(fig, path, dpi=120, metadata={"Description": self.config_comment()})
            plt.close(fig)
        return fig


# ----------------------------------------------------------------------------- entry points
def neuron_level(
    model: nn.Module,
    dataset: str | LabelledImages,
    config: NeuronLevelConfig,
    *,
    means_dataset: LabelledImages | None = None,
    out: str | os.PathLike | None = None,
    sparsity: float | None = None,
    means_directory: str | os.PathLike | None = None,
    shard: Shard = Shard(),
    offset: int = 0,
    show_progress: bool = True,
) -> NeuronLevelResult:
    """The neuron level of one model (the analysis pattern: model, dataset source, config).

    ``dataset``: a :func:`~hooked_vit.data.load_dataset` source (then ``config.split`` and
    ``config.means_split`` of it are used) or a :class:`LabelledImages` (then ``means_dataset``,
    default the same images, gives the means). ``sparsity`` labels the rows (default: the
    model's pruning sparsity, 0 if dense). With ``out``, per-class records are saved under
    ``sparsity_dir(out, sparsity)`` and reused on a rerun; means default to ``<out>/means``.
    ``shard``: analyse only this process's classes (``shard.take(classes, offset)``).
    """
    start = time.perf_counter()
    if isinstance(dataset, LabelledImages):
        data, means_data = dataset, means_dataset if means_dataset is not None else dataset
    else:
        data = load_dataset(dataset, split=config.split, model=model)
        means_data = (means_dataset if means_dataset is not None
                      else load_dataset(dataset, split=config.means_split, model=model))
    if config.n_means_images is not None:
        means_data = calibration_sample(means_data, config.n_means_images, seed=config.seed)
    if sparsity is None:
        info = getattr(model, "pruning_info", None)
        sparsity = float(info.sparsity) if info is not None else 0.0
    directory = sparsity_dir(out, sparsity) if out is not None else None
    if means_directory is None and out is not None:
        means_directory = Path(out) / "means"
    only = None if shard.whole else shard.take(resolve_classes(data, config.classes), offset)
    records = model_records(model, data, means_data, config, directory=directory,
                            means_directory=means_directory, only=only, show_progress=show_progress)
    return NeuronLevelResult(config, flatten_records(sparsity, records), {f"{float(sparsity):g}": model_key(model)},
                             time.perf_counter() - start, type_rows=flatten_type_records(sparsity, records))


def run_neuron_metrics(
    config: NeuronLevelConfig,
    out: str | os.PathLike | None = None,
    *,
    model_loader: Callable[[NeuronLevelConfig, float], nn.Module] = load_model,
    dataset: LabelledImages | None = None,
    means_dataset: LabelledImages | None = None,
    means_directory: str | os.PathLike | None = None,
    shard: Shard = Shard(),
    show_progress: bool = True,
) -> NeuronLevelResult | None:
    """The neuron level over ``config.sparsities``: each model from ``model_loader(config, s)``,
    analysed by :func:`neuron_level` (per-class files under ``out``, resumable), the combined
    result saved to ``out`` (tables, markdown, figure) when given. ``dataset``/``means_dataset``
    replace ``config.dataset`` (e.g. tensors for tests); ``means_directory`` (default
    ``<out>/means``) holds the mean activations. With a partial ``shard``, only its share of the
    (model, class) units is computed and saved, and nothing is returned."""
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    type_rows: list[dict[str, Any]] = []
    keys: dict[str, str] = {}
    for index, sparsity in enumerate(config.sparsities):
        model = model_loader(config, float(sparsity))
        result = neuron_level(model, dataset if dataset is not None else config.dataset, config,
                              means_dataset=means_dataset, out=out, sparsity=float(sparsity),
                              means_directory=means_directory, shard=shard, offset=index,
                              show_progress=show_progress)
        rows += result.rows
        type_rows += result.type_rows
        keys.update(result.model_keys)
        del model
    if not shard.whole:
        return None
    result = NeuronLevelResult(config, rows, keys, time.perf_counter() - start, type_rows=type_rows)
    if out is not None:
        result.save(out)
    return result


# ----------------------------------------------------------------------------- command line
def config_from_args(args: argparse.Namespace) -> tuple[NeuronLevelConfig, Path]:
    """A :class:`NeuronLevelConfig` and output folder from parsed ``neuron-metrics`` arguments."""
    blocks = None if args.blocks is None else parse_numbers(args.blocks, "--blocks", int)
    config = NeuronLevelConfig(
        model=args.model, dataset=args.data, split=args.split, means_split=args.means_split,
        sparsities=parse_numbers(args.sparsities, "--sparsities"), method=args.method,
        finetune_epochs=args.finetune_epochs, n_calib=args.n_calib,
        calib_sampling=args.calib_sampling, classes=parse_classes(args.classes), blocks=blocks, top_k=args.top_k,
        sites=tuple(s.strip() for s in args.sites.split(",") if s.strip()), selection=args.selection,
        negatives=args.negatives, pooled_means=args.pooled_means,
        n_means_images=args.n_means_images, seed=args.seed, batch_size=args.batch_size, device=args.device,
    )
    return config, Path(args.out) if args.out else Path("runs") / f"neuron-metrics-{config.model}"


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit neuron-metrics``: run, print the table and the files written."""
    config, out = config_from_args(args)
    result = run_neuron_metrics(config, out, show_progress=not args.no_progress)
    print(result.markdown())
    print(f"\n{result.seconds:.0f} s; wrote {out}/summary.csv, summary.md, per_class.csv, figure.png, result.json "
          f"and per-class records under {out}/sparsity_*/classes/")
    return 0


__all__ = [
    "METRICS", "NEURON_SITES", "ActivationTables", "NeuronLevelConfig", "NeuronLevelResult", "activation_tables",
    "add_arguments", "config_from_args", "default_blocks", "flatten_records", "flatten_type_records", "load_model", "main", "model_records",
    "neuron_level", "neuron_sites", "resolve_blocks", "resolve_classes", "run_neuron_metrics", "selection_scores",
    "sparsity_dir", "top_units", "unit_labels",
]
