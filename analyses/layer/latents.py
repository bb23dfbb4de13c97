"""The layer level's per-model evaluation (IMPACT sec. 3.3 / 4.3): an SAE's reconstruction quality
on the held-out images (Table 2) and the four neuron-level metrics applied to its latents (Figure 3).

On the ``split`` images (held out), for a model and its trained SAE:

1. quality (:mod:`analyses.layer.sae_quality`): NMSE, explained variance, dead latents (never active
   over the held-out tokens), L0;
2. per class ``c``: the top-K latents by attribution patching (:mod:`analyses.common.attribution_patching`)
   with zero as the reference, run through the spliced SAE (error term on, so only latents change):
   the K latents whose zeroing is estimated to lower the logit of ``c`` most; then, as for neurons,
   ablation impact (the K latents zero-ablated together, eq. 2, over the class images; the paper
   uses zero ablation for SAE latents), and selectivity, class variance and label entropy
   (:mod:`analyses.common.metrics`) of the K latents over all held-out images, averaged over the K.

Latent activations per image: the CLS-token value (selectivity) and the max over patch tokens
(class variance, label entropy) for an SAE on all tokens, as for neurons (for a model without a
class token, the readout value of :func:`~analyses.common.metrics.readout_and_patch_max`); an SAE
on the CLS token only (the paper's probe; the pooled features ``hook_pooled`` for a model without a
class token) uses its one value for both, an SAE on patch tokens its max over patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.common.classes import resolve_classes
from analyses.common.metrics import (class_variance, label_entropy, normalized_logit_change, readout_and_patch_max,
                                     readout_hooks, selectivity, top_units)
from analyses.common.vocabulary import METRICS
from analyses.layer.activation_store import hook_layout, select_tokens
from analyses.layer.config import LayerConfig
from analyses.layer.sae import SAE, sae_hook, sae_hook_name, sae_tokens, spliced, zero_ablate_features
from analyses.layer.sae_quality import QualityAccumulator, SAEQuality
from analyses.common.attribution_patching import attribution_patching
from hooked_vit.data import LabelledImages, default_batch_size, make_loader, progress
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.sites import Site

SAE_SITE = "sae_latent"


@dataclass
class LatentTables:
    """Per held-out image: clean ``logits`` ``[n_images n_classes]``, ``labels``, and per latent its
    selectivity activation ``cls`` and pooled activation ``max`` (``[n_images d_sae]``, see the
    module docstring)."""

    logits: Float[Tensor, "n_images n_classes"]
    labels: Int[Tensor, "n_images"]
    cls: Float[Tensor, "n_images d_sae"]
    max: Float[Tensor, "n_images d_sae"]


@torch.no_grad()
def held_out_pass(
    model: nn.Module, sae: SAE, dataset: LabelledImages, *, batch_size: int | None = None, show_progress: bool = True
) -> tuple[SAEQuality, LatentTables]:
    """One forward pass over ``dataset`` giving both the SAE's quality at its hook and tokens
    (:class:`~analyses.layer.sae_quality.SAEQuality`) and the :class:`LatentTables` (on the CPU)."""
    hook_name, tokens = sae_hook_name(sae), sae_tokens(sae)
    layout = hook_layout(model, hook_name)
    param = next(model.parameters())
    accumulator = QualityAccumulator(sae.cfg.d_in, sae.cfg.d_sae)
    captured: list[Tensor] = []
    pool_patterns: list[Tensor] = []

    def capture(act: Tensor, hook: Any) -> None:
        captured.append(select_tokens(act.detach(), layout, tokens, model.cfg.n_ctx))

    def keep_pattern(pattern: Tensor, hook: Any) -> None:
        pool_patterns.append(pattern.detach())

    logits, labels, cls_parts, max_parts = [], [], [], []
    loader = make_loader(dataset, batch_size=batch_size, device=param.device)
    pattern_hooks = [(name, keep_pattern) for name in readout_hooks(model)] if tokens == "all" else []
    with model.hooks(fwd_hooks=[(hook_name, capture)] + pattern_hooks):
        for images, batch_labels in progress(loader, desc="held-out latents", total=len(loader),
                                             enabled=show_progress):
            captured.clear()
            pool_patterns.clear()
            logits.append(model(images.to(device=param.device, dtype=param.dtype)).float().cpu())
            labels.append(batch_labels)
            x = captured[0].to(sae.dtype)  # [batch n_tok d_in]
            latents = sae.encode(x)
            flat = x.reshape(-1, x.shape[-1])
            accumulator.update(flat, sae.decode(latents).reshape(flat.shape), latents.reshape(-1, latents.shape[-1]))
            latents = latents.float().cpu()
            if tokens == "all":
                readout, patch_max = readout_and_patch_max(latents, model.cfg,
                                                           pool_patterns[0].float().cpu() if pool_patterns else None)
                cls_parts.append(readout)
                max_parts.append(patch_max)
            else:
                pooled = latents.amax(dim=1)
                cls_parts.append(pooled)
                max_parts.append(pooled)
    tables = LatentTables(torch.cat(logits), torch.cat(labels), torch.cat(cls_parts), torch.cat(max_parts))
    return accumulator.result(), tables


def latent_site(sae: SAE) -> Site:
    """The attached SAE's latents as a :class:`Site` (hook ``<hook>.hook_sae_acts_post``, one
    feature unit per latent), for :func:`~analyses.common.attribution_patching.attribution_patching`."""
    hook_name = sae_hook_name(sae)
    layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else -1
    return Site(layer, SAE_SITE, sae_hook(hook_name, "acts_post"), "feature", sae.cfg.d_sae)


def latent_scores(
    model: nn.Module, sae: SAE, images: Float[Tensor, "n channel height width"], target: int, *, batch_size: int
) -> Float[Tensor, "d_sae"]:
    """Per latent, the estimated drop of the ``target`` logit when it is zeroed (attribution
    patching through the SAE spliced with its error term), averaged over ``images``."""
    site = latent_site(sae)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    with spliced(model, sae, use_error_term=True):
        for start in range(0, images.shape[0], batch_size):
            estimates = attribution_patching(model, images[start:start + batch_size], [site], targets=target,
                                             reference="zero").estimates[site.hook_name]
            total -= estimates.double().sum(dim=0).cpu()
    return total / images.shape[0]


@torch.no_grad()
def ablated_logits(
    model: nn.Module, sae: SAE, images: Float[Tensor, "n channel height width"], latents: Int[Tensor, "k"],
    *, batch_size: int
) -> Float[Tensor, "n n_classes"]:
    """Logits with ``latents`` zeroed in the SAE spliced with its error term (nothing else changes)."""
    hook = [(sae_hook(sae_hook_name(sae), "acts_post"), zero_ablate_features(latents))]
    with spliced(model, sae, use_error_term=True):
        return torch.cat([model.run_with_hooks(images[i:i + batch_size], fwd_hooks=hook).float().cpu()
                          for i in range(0, images.shape[0], batch_size)])


def latent_metrics(
    model: nn.Module,
    sae: SAE,
    dataset: LabelledImages,
    tables: LatentTables,
    config: LayerConfig,
    *,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Per class of ``dataset``: the four metrics over its top-K latents (see the module docstring),
    with the latents, their scores and per-latent values; ``tables`` from :func:`held_out_pass`."""
    param = next(model.parameters())
    batch_size = config.batch_size or default_batch_size(param.device)
    if config.top_k > sae.cfg.d_sae:
        raise InvalidArgumentError(f"top_k={config.top_k} exceeds the SAE's {sae.cfg.d_sae} latents")
    labels = tables.labels
    entropy = label_entropy(tables.max, labels, dataset.num_classes, config.negatives)
    records = []
    classes = resolve_classes(dataset, config.classes)
    for target in progress(classes, desc="classes", total=len(classes), enabled=show_progress):
        is_target = labels == target
        positions = torch.nonzero(is_target).reshape(-1)
        images = dataset.subset(positions).tensors(show_progress=False)[0].to(device=param.device, dtype=param.dtype)
        scores = latent_scores(model, sae, images, target, batch_size=batch_size)
        chosen = top_units(scores, config.top_k)
        ablated = ablated_logits(model, sae, images, chosen.to(param.device), batch_size=batch_size)
        ablation = normalized_logit_change(tables.logits[is_target], ablated, target)
        sel = selectivity(tables.cls[:, chosen], labels, target)
        cv = class_variance(tables.max[:, chosen], labels, target, config.negatives)
        ent = entropy[chosen]
        records.append({
            "class": target, "class_name": dataset.class_names[target], "n_images": int(is_target.sum()),
            "ablation": float(ablation.mean()), "selectivity": float(sel.mean()),
            "class_variance": float(cv.mean()), "label_entropy": float(ent.mean()),
            "latents": chosen.tolist(), "scores": scores[chosen].tolist(),
            "latent_selectivity": sel.tolist(), "latent_class_variance": cv.tolist(),
            "latent_label_entropy": ent.tolist(),
        })
    return records


def evaluate_layer(
    model: nn.Module,
    sae: SAE,
    dataset: LabelledImages,
    config: LayerConfig,
    *,
    sparsity: float = 0.0,
    features: bool = True,
    show_progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """The held-out evaluation of one model and its trained SAE on ``dataset``: ``quality`` (one
    row) and, with ``features``, the latent metrics (``rows``: one per class, ``latents``: the
    class's latents and per-latent values), rows labelled with ``sparsity``."""
    if features and config.top_k > sae.cfg.d_sae:
        raise InvalidArgumentError(f"top_k={config.top_k} exceeds the SAE's {sae.cfg.d_sae} latents")
    quality, tables = held_out_pass(model, sae, dataset, batch_size=config.batch_size, show_progress=show_progress)
    quality_row = {"sparsity": float(sparsity), "model": config.model, "hook_name": sae_hook_name(sae),
                   "tokens": sae_tokens(sae), "k": config.sae.k, "expansion": config.sae.expansion_factor,
                   **quality.as_row()}
    rows, latents = [], []
    if features:
        for record in latent_metrics(model, sae, dataset, tables, config, show_progress=show_progress):
            rows.append({"sparsity": float(sparsity), **{k: record[k] for k in ("class", "class_name", "n_images")},
                         **{m: record[m] for m in METRICS}})
            latents.append({"sparsity": float(sparsity), **record})
    return {"quality": [quality_row], "rows": rows, "latents": latents}


__all__ = ["SAE_SITE", "LatentTables", "ablated_logits", "evaluate_layer", "held_out_pass", "latent_metrics",
           "latent_scores", "latent_site"]
