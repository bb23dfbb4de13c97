"""The one shape every level of the study has, and the registry of the five levels.

A level is a config dataclass (a :class:`~analyses.common.variants.ModelFamily` plus its own
settings), a ``run(config, out, *, shard, show_progress)`` over the model variants that saves each
unit of work under ``out`` as it goes (and returns the combined result, saved to ``out``, when the
shard is whole), and a result type (:class:`~analyses.common.results.AnalysisResult`) that loads
from ``out``, prints its tables (``markdown()``) and has written its figures (``FIGURES``: file ->
caption). The study runner, its CLI and the report work only through :data:`LEVELS`; the level
modules are imported when a level is used (names are ``"module:attribute"`` strings).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Level:
    """One level of the study: ``name`` (``--levels``), ``title``, the ``paper``'s tables and
    figures it reproduces, its ``unit`` of work, and where its config class, run function and
    result class live."""

    name: str
    title: str
    paper: str
    unit: str
    config: str
    run: str
    result: str
    docs: str  # the README section that explains it

    @property
    def config_class(self) -> type:
        return _resolve(self.config)

    @property
    def result_class(self) -> type:
        return _resolve(self.result)

    def __call__(self, config: Any, out: Any, **options: Any) -> Any:
        """``run(config, out, shard=..., show_progress=...)``: the combined result (whole shard) or ``None``."""
        return _resolve(self.run)(config, out, **options)


def _run_layer(config: Any, out: Any, *, shard: Any, show_progress: bool = True) -> Any:
    """The layer level as one run: train (or resume) each model's SAE, then evaluate them."""
    from analyses.layer.level import run_layer_level, train_layer_level

    train_layer_level(config, out, shard=shard)
    return run_layer_level(config, out, shard=shard, show_progress=show_progress)


LEVELS: dict[str, Level] = {level.name: level for level in (
    Level("accuracy", "Accuracy", "Table 1", "model",
          "analyses.accuracy.level:AccuracyConfig", "analyses.accuracy.level:run_accuracy",
          "analyses.accuracy.level:AccuracyResult", "#accuracy-vs-sparsity-impact-table-1"),
    Level("neuron", "Neuron level", "Table/Figure 2", "model x class",
          "analyses.neuron.level:NeuronLevelConfig", "analyses.neuron.level:run_neuron_metrics",
          "analyses.neuron.level:NeuronLevelResult", "#neuron-level-impact-sec-32--42"),
    Level("layer", "Layer level", "Table 2, Figure 3", "model (one SAE, its checkpoints, its evaluation)",
          "analyses.layer.level:LayerLevelConfig", "analyses.common.level:_run_layer",
          "analyses.layer.level:LayerLevelResult", "#layer-level-batchtopk-saes-through-sae-lens-impact-sec-33--43-appendix-b"),
    Level("circuit", "Circuit level", "Table 3", "model x class",
          "analyses.circuits.config:CircuitConfig", "analyses.circuits.runner:run_circuits",
          "analyses.circuits.runner:CircuitResult", "#circuit-level-node-masks-edges-ncq-impact-sec-34-44-tables-3-and-7"),
    Level("model", "Model level", "Table 4, Figure 4", "model x image chunk",
          "analyses.model.level:ModelLevelConfig", "analyses.model.level:run_model_level",
          "analyses.model.level:ModelLevelResult", "#model-level-transformer-attribution-attnlrp-insertiondeletion-table-4-figure-4"),
)}
LEVEL_NAMES: tuple[str, ...] = tuple(LEVELS)
