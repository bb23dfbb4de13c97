"""Neuron level (IMPACT sec. 3.2 / 4.2, Figure 2): one unit of work per class of each model
(``<out>/sparsity_<s>/classes/<c>.json``). Per model, :meth:`Neuron.prepare` builds the state every
class needs (ablation means in ``<out>/means``, activation tables, label entropies, CLS ranks:
:class:`~analyses.neuron.analysis.ModelAnalysis`); :meth:`Neuron.compute` is one class's record
(:meth:`~analyses.neuron.analysis.ModelAnalysis.class_record`); :meth:`Neuron.combine` flattens the
saved records into the result's rows. Light at import: torch is imported when a model is analysed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from analyses.common.classes import resolve_classes
from analyses.common.level import Level, Record, Variant, register_level
from analyses.common.results import config_to_dict
from analyses.neuron.config import NeuronConfig
from analyses.neuron.result import NeuronResult, flatten_records, flatten_type_records

if TYPE_CHECKING:
    from analyses.neuron.analysis import ModelAnalysis


# ----------------------------------------------------------------------------- the level
@register_level("neuron")
class Neuron(Level):
    """Figure 2: per model, one unit per class; per class and block the top-K units by attribution
    patching and the four metrics over them."""

    title = "Neuron level"
    paper = "Figure 2"
    unit = "model x class"
    Config = NeuronConfig
    Result = NeuronResult
    run_only = ("sparsities", "classes", "batch_size", "device")
    open_choices = ("blocks", "sites", "top_k", "selection", "negatives", "pooled_means", "n_means_images")
    figures: ClassVar[dict[str, str]] = {"figure.png": "Figure 2: neuron metrics vs sparsity (early, middle, late block)"}
    paper_numbers = None  # the paper shows Figure 2 only, no table

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._classes: dict[str, list[int]] = {}
        self._loaded: tuple[tuple[str, int, str], Any, Any] | None = None

    # -- units: one per class
    def classes(self, config: NeuronConfig) -> list[int]:
        """The class indices analysed (:func:`resolve_classes` on ``config.split``; its labels only,
        no model is loaded)."""
        key = json.dumps(config_to_dict(config), sort_keys=True)
        if key not in self._classes:
            self._classes[key] = resolve_classes(self.dataset(config, config.split), config.classes)
        return self._classes[key]

    def units(self, config: NeuronConfig) -> list[str]:
        return [f"classes/{c}" for c in self.classes(config)]

    # -- per model
    def _datasets(self, config: NeuronConfig, model: Any, variant: Variant) -> tuple[Any, Any]:
        """The analysed images and those the means are taken over (a class-balanced sample of
        ``n_means_images``), loaded once per model."""
        key = (variant.key, id(model), json.dumps(config_to_dict(config), sort_keys=True))
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1], self._loaded[2]
        data = self.dataset(config, config.split, model)
        means_data = self.dataset(config, config.means_split, model)
        if config.n_means_images is not None:
            from hooked_vit.data import calibration_sample

            means_data = calibration_sample(means_data, config.n_means_images, seed=config.seed)
        self._loaded = (key, data, means_data)
        return data, means_data

    def settings(self, config: NeuronConfig, model: Any, variant: Variant) -> dict[str, Any]:
        """The driver's settings and the identity of the images analysed and averaged over."""
        data, means_data = self._datasets(config, model, variant)
        return {**super().settings(config, model, variant), "dataset": data.name, "split": data.split,
                "n_images": len(data), "means_dataset": means_data.name, "means_split": means_data.split}

    def prepare(self, config: NeuronConfig, model: Any, variant: Variant, out: Path) -> ModelAnalysis:
        """Means (``<out>/means``), activation tables, label entropies and CLS ranks of ``model``."""
        import torch

        from analyses.common.ablation import load_or_compute_means
        from analyses.common.metrics import top_units
        from analyses.neuron.analysis import ModelAnalysis, neuron_sites, resolve_blocks

        data, means_data = self._datasets(config, model, variant)
        self._loaded = None
        resolve_classes(data, config.classes)
        for block in resolve_blocks(model, config.blocks):  # fail early on a top-K larger than a block
            top_units(torch.zeros(sum(s.width for s in neuron_sites(model, block, config.sites))), config.top_k)
        means = load_or_compute_means(model, means_data, directory=Path(out) / "means",
                                      batch_size=config.batch_size, show_progress=self.show_progress)
        return ModelAnalysis(model, data, means, config, show_progress=self.show_progress)

    def compute(self, unit: str, model: Any, data: ModelAnalysis) -> dict[str, Any]:
        """Class ``unit`` (``classes/<c>``): :meth:`ModelAnalysis.class_record`."""
        return data.class_record(int(unit.split("/")[1]))

    def combine(self, config: NeuronConfig, records: list[Record]) -> NeuronResult:
        rows: list[dict[str, Any]] = []
        type_rows: list[dict[str, Any]] = []
        for r in records:
            rows += flatten_records(r.variant.sparsity, [r.record])
            type_rows += flatten_type_records(r.variant.sparsity, [r.record])
        keys = {f"{r.variant.sparsity:g}": r.settings["model_key"] for r in records}
        return NeuronResult(config, rows, keys, sum(r.seconds for r in records), type_rows=type_rows)


__all__ = ["Neuron"]
