"""Layer level of IMPACT (sec. 3.3 and 4.3): a BatchTopK SAE per model (dense and pruned) on one
hook, its reconstruction quality (Table 2) and the four neuron-level metrics applied to its latents
(Figure 3), plus the SAE sweeps of appendix B (Tables 5 and 6).

Per sparsity ``s`` of ``config.sparsities`` (0 = dense): the model ``config.model`` pruned with
``config.method``; an SAE trained by sae-lens (:func:`analyses.layer.sae.train_sae`) on the
``train_split`` images, saved in ``<out>/sparsity_<s>/sae/`` (sae-lens format, resumable); then on
the ``split`` images (held out):

1. quality (:mod:`analyses.layer.sae_quality`): NMSE, explained variance, dead latents (never active
   over the held-out tokens), L0;
2. per class ``c``: the top-K latents by attribution patching (:mod:`analyses.neuron.attribution_patching`)
   with zero as the reference, run through the spliced SAE (error term on, so only latents change):
   the K latents whose zeroing is estimated to lower the logit of ``c`` most; then, as for neurons,
   ablation impact (the K latents zero-ablated together, eq. 2, over the class images; the paper
   uses zero ablation for SAE latents), and selectivity, class variance and label entropy
   (:mod:`analyses.neuron.metrics`) of the K latents over all held-out images, averaged over the K.

Latent activations per image: the CLS-token value (selectivity) and the max over patch tokens
(class variance, label entropy) for an SAE on all tokens, as for neurons; an SAE on the CLS token
only (the paper's probe) uses its CLS value for both, an SAE on patch tokens its max over patches.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.layer.activation_store import hook_layout, select_tokens
from analyses.common.ablation import model_key
from analyses.neuron.attribution_patching import attribution_patching
from analyses.layer.cli import add_eval_arguments, add_train_arguments
from analyses.neuron.level import METRIC_LABELS, METRICS, resolve_classes, top_units
from analyses.neuron.metrics import NEGATIVE_RULES, class_variance, label_entropy, normalized_logit_change, selectivity
from analyses.common.defaults import DEFAULT_MODEL, DEFAULT_SPARSITIES
from analyses.common.variants import ModelFamily, load_model, sparsity_dir
from analyses.common.results import (
    AnalysisResult,
    config_from_dict,
    config_to_dict,
    markdown_table,
    read_json,
    settings_without,
    write_json,
)
from analyses.common.units import Shard, load_unit, save_unit
from analyses.layer.sae import (
    OPERATIONAL_FIELDS,
    SAE,
    SAETrainConfig,
    SAETrainingRun,
    load_sae,
    sae_hook,
    sae_hook_name,
    sae_tokens,
    spliced,
    train_sae,
    zero_ablate_features,
)
from analyses.layer.sae_quality import QualityAccumulator, SAEQuality, SweepConfig, SweepResult, sae_label, sweep_row
from hooked_vit import atomic
from hooked_vit.data import LabelledImages, default_batch_size, load_dataset, make_loader, progress
from hooked_vit.cli_args import parse_classes, parse_numbers
from hooked_vit.errors import InvalidArgumentError, MissingFileError
from hooked_vit.sites import Site

CONFIG_FILE = "layer_level_config.json"
EVALUATION_FILE = "evaluation.json"
# Settings that do not change a model's evaluation (a resumed run may differ in them).
_RUN_ONLY = ("sparsities", "batch_size", "device")
SAE_SITE = "sae_latent"


def _as_train_config(value: Any) -> SAETrainConfig:
    return SAETrainConfig(**value) if isinstance(value, dict) else value


@dataclass
class LayerLevelConfig(ModelFamily):
    """Settings of a layer-level run.

    ``model`` pruned with ``method`` (Wanda calibrated on ``n_calib`` train images of ``dataset``
    drawn by ``calib_sampling``, then ``finetune_epochs`` of masked fine-tuning on that train split;
    ``None``: the model preset's protocol, :func:`analyses.common.variants.variant_settings`) at each of
    ``sparsities`` (0 = dense). ``dataset``: source for :func:`hooked_vit.data.load_dataset`
    (``"builtin"``: the model's own); SAEs train on ``train_split`` and are evaluated on ``split``.
    ``sae``: the SAE and its training (hook, tokens, k, expansion factor, ...), identical for every
    model as in the paper. ``classes`` (default all present), ``top_k`` latents per class,
    ``negatives`` (rule of :mod:`analyses.neuron.metrics`). ``batch_size``: images per forward
    pass; ``device``: default CUDA when available.
    """

    train_split: str = "train"
    split: str = "val"
    sae: SAETrainConfig | dict[str, Any] = field(default_factory=SAETrainConfig)  # a dict (JSON) is converted
    classes: tuple[int | str, ...] | None = None
    top_k: int = 50
    negatives: str = "clamp"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sae = _as_train_config(self.sae)
        if self.top_k < 1:
            raise InvalidArgumentError(f"top_k must be >= 1, got {self.top_k}")
        if self.negatives not in NEGATIVE_RULES:
            raise InvalidArgumentError(f"negatives must be one of {NEGATIVE_RULES}, got {self.negatives!r}")


def sparsity_label(sparsity: float) -> str:
    return "dense" if float(sparsity) == 0 else f"{float(sparsity):g}"


def sae_dir(out: str | os.PathLike, sparsity: float, sae: SAETrainConfig) -> Path:
    """``<out>/sparsity_<s>/<sae_label>``: where the SAE of one model and SAE setting is saved
    (the main SAE and the sweep's share the layout, so the sweep reuses the main one)."""
    return sparsity_dir(out, sparsity) / sae_label(sae)


def model_sae_config(config: LayerLevelConfig, sparsity: float, sae: SAETrainConfig | None = None) -> SAETrainConfig:
    """``sae`` (default ``config.sae``) with its activation cache, if any, in a folder per model."""
    sae = config.sae if sae is None else sae
    if sae.cache_dir is None:
        return sae
    return dataclasses.replace(sae, cache_dir=str(sparsity_dir(sae.cache_dir, sparsity) / sae_label(sae)))


# ----------------------------------------------------------------------------- latent tables
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

    def capture(act: Tensor, hook: Any) -> None:
        captured.append(select_tokens(act.detach(), layout, tokens, model.cfg.n_ctx))

    logits, labels, cls_parts, max_parts = [], [], [], []
    loader = make_loader(dataset, batch_size=batch_size, device=param.device)
    with model.hooks(fwd_hooks=[(hook_name, capture)]):
        for images, batch_labels in progress(loader, desc="held-out latents", total=len(loader),
                                             enabled=show_progress):
            captured.clear()
            logits.append(model(images.to(device=param.device, dtype=param.dtype)).float().cpu())
            labels.append(batch_labels)
            x = captured[0].to(sae.dtype)  # [batch n_tok d_in]
            latents = sae.encode(x)
            flat = x.reshape(-1, x.shape[-1])
            accumulator.update(flat, sae.decode(latents).reshape(flat.shape), latents.reshape(-1, latents.shape[-1]))
            latents = latents.float().cpu()
            if tokens == "all":
                cls_parts.append(latents[:, 0])
                max_parts.append(latents[:, 1:].amax(dim=1))
            else:
                pooled = latents.amax(dim=1)
                cls_parts.append(pooled)
                max_parts.append(pooled)
    tables = LatentTables(torch.cat(logits), torch.cat(labels), torch.cat(cls_parts), torch.cat(max_parts))
    return accumulator.result(), tables


def latent_site(sae: SAE) -> Site:
    """The attached SAE's latents as a :class:`Site` (hook ``<hook>.hook_sae_acts_post``, one
    feature unit per latent), for :func:`~analyses.neuron.attribution_patching.attribution_patching`."""
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
    config: LayerLevelConfig,
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


# ----------------------------------------------------------------------------- result
@dataclass
class LayerLevelResult(AnalysisResult):
    """Layer-level numbers: ``quality`` has one row per sparsity (Table 2: NMSE, explained
    variance, dead latents over ``n_tokens`` held-out tokens, L0), ``rows`` one per (sparsity,
    class) with the four metrics averaged over the class's top-K latents (Figure 3), and
    ``latents`` the per-class latent indices and per-latent values."""

    CONFIG_CLASS: ClassVar[type] = LayerLevelConfig
    config: LayerLevelConfig
    quality: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    latents: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sparsities(self) -> list[float]:
        return sorted({r["sparsity"] for r in self.quality} | {r["sparsity"] for r in self.rows})

    def values(self, metric: str, sparsity: float) -> list[float]:
        """Per-class values of ``metric`` at ``sparsity``."""
        if metric not in METRICS:
            raise InvalidArgumentError(f"unknown metric {metric!r}; metrics are {METRICS}")
        return [r[metric] for r in self.rows if r["sparsity"] == sparsity]

    def summary(self) -> list[dict[str, Any]]:
        """Per sparsity: number of classes and mean/std (population) of each metric."""
        out = []
        for sparsity in sorted({r["sparsity"] for r in self.rows}):
            row: dict[str, Any] = {"sparsity": sparsity}
            for metric in METRICS:
                values = torch.tensor(self.values(metric, sparsity), dtype=torch.float64)
                row["n_classes"] = values.numel()
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(correction=0))
            out.append(row)
        return out

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"quality": self.quality, "per_class": self.rows, "summary": self.summary()}

    def table2(self) -> str:
        """Table 2 analogue (markdown): NMSE, dead latents (count / d_sae and fraction; the paper reports
        the fraction), explained variance (%) per sparsity."""
        rows = [{"Sparsity": sparsity_label(q["sparsity"]), "NMSE ↓": f"{q['nmse']:.4f}",
                 "Dead ↓": f"{q['dead_latents']} / {q['d_sae']} ({q['dead_latents'] / q['d_sae']:.3f})",
                 "Expl. Var. (%) ↑": f"{100 * q['explained_variance']:.2f}",
                 "L0": f"{q['l0']:.1f}"} for q in self.quality]
        return markdown_table(rows)

    def markdown(self) -> str:
        """Table 2 analogue, then the latent metrics summary (mean ± std over classes)."""
        text = self.table2()
        if self.rows:
            rows = [{"sparsity": sparsity_label(r["sparsity"]), "classes": r["n_classes"],
                     **{METRIC_LABELS[m]: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS}}
                    for r in self.summary()]
            text += "\n\n" + markdown_table(rows)
        return text

    def save(self, directory: str | os.PathLike) -> Path:
        """``result.json``, ``quality.csv``, ``per_class.csv``, ``summary.csv``, ``summary.md`` and,
        with latent metrics, ``figure.png``."""
        directory = super().save(directory)
        atomic.write_text(directory / "summary.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        if self.rows:
            self.plot(directory / "figure.png")
        return directory

    def plot(self, path: str | os.PathLike | None = None):
        """The paper's Figure 3: violins of the per-class values of each metric (panels), one per
        sparsity. Saved to ``path`` (PNG) if given; returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        sparsities = sorted({r["sparsity"] for r in self.rows})
        colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.9, max(len(sparsities), 1)).tolist())
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], METRICS):
            for x, (sparsity, colour) in enumerate(zip(sparsities, colours)):
                values = self.values(metric, sparsity)
                if len(values) >= 2 and max(values) - min(values) > 1e-12:
                    parts = ax.violinplot([values], positions=[x], widths=0.8, showmeans=True)
                    for body in parts["bodies"]:
                        body.set_facecolor(colour)
                        body.set_alpha(0.7)
                    for key in ("cmeans", "cmins", "cmaxes", "cbars"):
                        parts[key].set_color(colour)
                elif values:  # one value or all equal: no density to draw
                    ax.scatter([x] * len(values), values, color=colour, s=12)
            ax.set_xticks(range(len(sparsities)), [sparsity_label(s) for s in sparsities])
            ax.set_title(METRIC_LABELS[metric])
            ax.set_xlabel("sparsity")
            ax.grid(alpha=0.3, axis="y")
        c, sae = self.config, self.config.sae
        hook = self.quality[0]["hook_name"] if self.quality else sae.hook_name or "last resid_post"
        fig.suptitle(f"Layer level: {c.model}, {c.method}; BatchTopK SAE at {hook} "
                     f"({sae.tokens}, k={sae.k:g}, x{sae.expansion_factor}), top-{c.top_k} latents per class")
        fig.tight_layout()
        if path is not None:
            atomic.save_figure(fig, path, dpi=120, metadata={"Description": self.config_comment()})
            plt.close(fig)
        return fig


# ----------------------------------------------------------------------------- entry points
def _datasets(config: LayerLevelConfig, model: nn.Module, dataset: LabelledImages | None,
              train_dataset: LabelledImages | None) -> tuple[LabelledImages, LabelledImages]:
    held_out = dataset if dataset is not None else load_dataset(config.dataset, split=config.split, model=model)
    train = train_dataset if train_dataset is not None else load_dataset(config.dataset, split=config.train_split,
                                                                         model=model)
    return train, held_out


def train_layer_level(
    config: LayerLevelConfig,
    out: str | os.PathLike,
    *,
    model_loader: Callable[[LayerLevelConfig, float], nn.Module] = load_model,
    train_dataset: LabelledImages | None = None,
    resume: bool = True,
    shard: Shard = Shard(),
) -> list[SAETrainingRun]:
    """Train (or load, or resume) the SAE of every sparsity (of ``shard``'s share of them) into
    :func:`sae_dir` and write ``<out>/layer_level_config.json``. ``train_dataset`` replaces the
    config's (e.g. tensors)."""
    write_json(Path(out) / CONFIG_FILE, config_to_dict(config))
    runs = []
    for sparsity in shard.take(config.sparsities):
        model = model_loader(config, float(sparsity))
        train = train_dataset if train_dataset is not None else load_dataset(
            config.dataset, split=config.train_split, model=model)
        runs.append(train_sae(model, train, model_sae_config(config, sparsity),
                              out_dir=sae_dir(out, sparsity, config.sae), resume=resume))
        del model
    return runs


def layer_level(
    model: nn.Module,
    sae: SAE,
    dataset: LabelledImages,
    config: LayerLevelConfig,
    *,
    sparsity: float = 0.0,
    features: bool = True,
    show_progress: bool = True,
) -> LayerLevelResult:
    """The layer level of one model and its trained SAE on held-out ``dataset``: quality and (with
    ``features``) the latent metrics, rows labelled with ``sparsity``."""
    start = time.perf_counter()
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
    return LayerLevelResult(config, [quality_row], rows, latents, {f"{float(sparsity):g}": model_key(model)},
                            time.perf_counter() - start)


def run_layer_level(
    config: LayerLevelConfig,
    out: str | os.PathLike,
    *,
    model_loader: Callable[[LayerLevelConfig, float], nn.Module] = load_model,
    dataset: LabelledImages | None = None,
    features: bool = True,
    shard: Shard = Shard(),
    show_progress: bool = True,
) -> LayerLevelResult | None:
    """Evaluate the SAEs trained by :func:`train_layer_level` under ``out`` (each must exist and
    match its model's weights) on the held-out split (or ``dataset``); each model's evaluation is
    saved beside its SAE (``evaluation.json``) and reused by a rerun with the same settings; saves
    the combined result (tables, markdown, figure) to ``out``. With a partial ``shard``, only its
    share of the models is evaluated, and nothing is returned."""
    start = time.perf_counter()
    combined = LayerLevelResult(config)
    for sparsity in shard.take(config.sparsities):
        directory = sae_dir(out, sparsity, config.sae)
        try:
            sae = load_sae(directory)
        except FileNotFoundError:
            raise MissingFileError(f"no trained SAE in {directory}: run `hooked-vit sae-train` with the same settings "
                                    "first (or train_layer_level)") from None
        model = model_loader(config, float(sparsity))
        key = model_key(model)
        trained_on = sae.cfg.metadata.model_key
        if trained_on is not None and trained_on != key:
            raise InvalidArgumentError(f"the SAE in {directory} was trained on other weights ({trained_on}) than "
                                       f"{config.model} at sparsity {sparsity:g} ({key}); retrain it")
        held_out = dataset if dataset is not None else load_dataset(config.dataset, split=config.split, model=model)
        settings = {**settings_without(config, _RUN_ONLY), "model_key": key, "features": features,
                    "sae": {k: v for k, v in config_to_dict(config.sae).items() if k not in OPERATIONAL_FIELDS},
                    "dataset": held_out.name, "split": held_out.split, "n_images": len(held_out)}
        saved = load_unit(directory / EVALUATION_FILE, settings, "a layer-level evaluation (JSON)")
        if saved is not None:
            part = LayerLevelResult(config, **saved)
        else:
            sae.to(device=next(model.parameters()).device)
            part = layer_level(model, sae, held_out, config, sparsity=float(sparsity), features=features,
                               show_progress=show_progress)
            save_unit(directory / EVALUATION_FILE, settings, part.data_dict())
        combined.quality += part.quality
        combined.rows += part.rows
        combined.latents += part.latents
        combined.model_keys.update(part.model_keys)
        del model
    if not shard.whole:
        return None
    combined.seconds = time.perf_counter() - start
    combined.save(out)
    return combined


def run_sae_sweep(
    config: LayerLevelConfig,
    sweep: SweepConfig,
    out: str | os.PathLike,
    *,
    model_loader: Callable[[LayerLevelConfig, float], nn.Module] = load_model,
    dataset: LabelledImages | None = None,
    train_dataset: LabelledImages | None = None,
) -> SweepResult:
    """Tables 5/6: the sweep's SAE settings trained and evaluated for every sparsity of
    ``config``; SAEs in :func:`sae_dir` (finished ones, e.g. the main SAE, are reused), the table
    in ``<out>/sweep/``."""
    rows: list[dict[str, Any]] = []
    for sparsity in config.sparsities:
        model = model_loader(config, float(sparsity))
        train, held_out = _datasets(config, model, dataset, train_dataset)
        label = "dense" if float(sparsity) == 0 else f"{config.method} {float(sparsity):g}"
        for setting in sweep.settings():
            run = train_sae(model, train, model_sae_config(config, sparsity, setting),
                            out_dir=sae_dir(out, sparsity, setting))
            rows.append({"model": label, **sweep_row(model, run, held_out, config.batch_size)})
        del model
    result = SweepResult(sweep, rows)
    result.save(Path(out) / "sweep")
    atomic.write_text(Path(out) / "sweep" / "sweep.md", result.markdown() + "\n")
    return result


# ----------------------------------------------------------------------------- command line
def config_from_args(args: argparse.Namespace) -> tuple[LayerLevelConfig, Path]:
    """A :class:`LayerLevelConfig` and output folder from parsed ``sae-train`` arguments."""
    sae = SAETrainConfig(
        hook_name=args.hook, tokens=args.tokens, k=args.k, expansion_factor=args.expansion,
        training_samples=args.samples, train_batch_size=args.train_batch_size, lr=args.lr,
        lr_scheduler=args.lr_scheduler, lr_warm_up_steps=args.lr_warm_up_steps, lr_decay_steps=args.lr_decay_steps,
        aux_loss_coefficient=args.aux_coefficient, dead_feature_window=args.dead_window,
        topk_threshold_lr=args.threshold_lr, normalize_activations=args.normalize, buffer_size=args.buffer_size,
        image_batch_size=args.batch_size, cache_dir=args.cache_dir, n_checkpoints=args.checkpoints,
        log_every=args.log_every, seed=args.seed, device=args.device,
    )
    config = LayerLevelConfig(model=args.model, dataset=args.data, train_split=args.train_split, split=args.split,
                              sparsities=parse_numbers(args.sparsities, "--sparsities"), method=args.method,
                              finetune_epochs=args.finetune_epochs, n_calib=args.n_calib,
        calib_sampling=args.calib_sampling, sae=sae, batch_size=args.batch_size,
                              device=args.device)
    return config, Path(args.out) if args.out else Path("runs") / f"layer-level-{config.model}"


def train_main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit sae-train``: train one SAE per sparsity (resuming), and the
    sweep when asked; prints a line per SAE and the sweep table."""
    config, out = config_from_args(args)
    start = time.perf_counter()
    for sparsity, run in zip(config.sparsities, train_layer_level(config, out, resume=not args.no_resume)):
        final = run.log[-1] if run.log else {}
        state = "loaded (already trained)" if run.training_sae is None else f"trained in {run.seconds:.0f} s"
        print(f"{sparsity_label(sparsity):>6}: {state}; {run.hook_name} ({config.sae.tokens}), d_sae "
              f"{run.sae.cfg.d_sae}, train mse {final.get('mse_loss', float('nan')):.4g}, "
              f"fve {final.get('explained_variance', float('nan')):.4f} -> {run.out_dir}")
    sweeps = (args.sweep_k, args.sweep_expansion, args.sweep_tokens)
    if any(s is not None for s in sweeps):
        sweep = SweepConfig(base=config.sae,
                            ks=parse_numbers(args.sweep_k, "--sweep-k") if args.sweep_k else (),
                            expansion_factors=parse_numbers(args.sweep_expansion, "--sweep-expansion", int)
                            if args.sweep_expansion else (),
                            tokens=tuple(t.strip() for t in args.sweep_tokens.split(",")) if args.sweep_tokens else ())
        result = run_sae_sweep(config, sweep, out)
        print(result.markdown())
        print(f"wrote {out}/sweep/sweep.csv, sweep.md")
    print(f"{time.perf_counter() - start:.0f} s; config in {out / CONFIG_FILE}; evaluate with "
          f"`hooked-vit sae-eval --out {out}`")
    return 0


def eval_main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit sae-eval``: Table 2 and the latent metrics of the SAEs under
    ``--out``; prints the tables and writes them with the figure."""
    out = Path(args.out) if args.out else Path("runs") / f"layer-level-{DEFAULT_MODEL}"
    path = out / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"{out} holds no layer-level run ({CONFIG_FILE} missing): "
                                "run hooked-vit sae-train first")
    config = config_from_dict(LayerLevelConfig, read_json(path))
    changes: dict[str, Any] = {"negatives": args.negatives, "classes": parse_classes(args.classes)}
    if args.top_k is not None:
        changes["top_k"] = args.top_k
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.device is not None:
        changes["device"] = args.device
    config = dataclasses.replace(config, **changes)
    result = run_layer_level(config, out, features=not args.quality_only, show_progress=not args.no_progress)
    print(result.markdown())
    print(f"\n{result.seconds:.0f} s; wrote {out}/quality.csv, per_class.csv, summary.csv, summary.md, result.json"
          f"{', figure.png' if result.rows else ''}")
    return 0


__all__ = [
    "CONFIG_FILE", "DEFAULT_SPARSITIES", "LatentTables", "LayerLevelConfig", "LayerLevelResult", "ablated_logits",
    "add_eval_arguments", "add_train_arguments", "config_from_args", "eval_main", "latent_metrics", "latent_scores",
    "latent_site", "held_out_pass", "layer_level", "load_model", "model_sae_config", "run_layer_level", "run_sae_sweep",
    "sae_dir", "sparsity_dir",
    "train_layer_level", "train_main",
]
