"""Accuracy level (IMPACT Table 1): top-1 and top-5 accuracy of the dense model and each variant the
other levels analyse (the same cached, fine-tuned variants), on the held-out split.

One model is one unit: ``<out>/sparsity_<s>/accuracy.json`` is written as soon as it is measured,
with the settings and weights that produced it, and reused by a rerun. The result writes
``table1.csv``/``table1.md`` and ``result.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from analyses.common.ablation import model_key
from analyses.common.results import AnalysisResult, settings_without
from analyses.common.units import Shard, load_unit, save_unit
from analyses.common.variants import ModelFamily, load_model, sparsity_dir
from hooked_vit import atomic
from hooked_vit.data import LabelledImages, load_dataset
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.evaluation import evaluate

UNIT_FILE = "accuracy.json"
_RUN_ONLY = ("sparsities", "batch_size", "device")


@dataclass
class AccuracyConfig(ModelFamily):
    """The model family (:class:`~analyses.common.variants.ModelFamily`), measured on ``split`` of
    its dataset, ``batch_size`` images per forward (default by device)."""

    split: str = "val"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise InvalidArgumentError(f"batch_size must be a whole number >= 1 (or None), got {self.batch_size!r}")


@dataclass
class AccuracyResult(AnalysisResult):
    """One row per model: method, sparsity, measured overall sparsity, top-1/top-5 (fractions),
    loss and the number of images."""

    CONFIG_CLASS: ClassVar[type] = AccuracyConfig
    FIGURES: ClassVar[dict[str, str]] = {}
    config: AccuracyConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"table1": self.rows}

    def markdown(self) -> str:
        """The paper's Table 1 layout: Top-1 and Top-5 rows, one column per sparsity."""
        from hooked_vit.pruning.sweep import markdown_table

        return markdown_table(self.rows, tuple(sorted({float(r["sparsity"]) for r in self.rows})))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = super().save(directory)
        atomic.write_text(directory / "table1.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        return directory


def model_accuracy(model: nn.Module, data: LabelledImages, config: AccuracyConfig, sparsity: float) -> dict[str, Any]:
    """One model's row of :class:`AccuracyResult`."""
    start = time.perf_counter()
    metrics = evaluate(model, data, batch_size=config.batch_size, progress=False)
    info = getattr(model, "pruning_info", None)
    return {"method": config.method, "sparsity": float(sparsity),
            "overall_sparsity": float(info.overall_sparsity) if info is not None else 0.0,
            "top1": float(metrics["top1"]), "top5": float(metrics["top5"]), "loss": float(metrics["loss"]),
            "n": int(metrics["n"]), "seconds": time.perf_counter() - start}


def run_accuracy(
    config: AccuracyConfig,
    out: str | os.PathLike | None = None,
    *,
    dataset: LabelledImages | None = None,
    shard: Shard = Shard(),
    show_progress: bool = True,
) -> AccuracyResult | None:
    """Table 1 over ``config.sparsities`` (each variant built or loaded from the cache, measured on
    ``config.split`` or ``dataset``); per-model files under ``out`` (resumable), the combined result
    saved there. With a partial ``shard``, only its share of the models is measured, and nothing is
    returned."""
    start = time.perf_counter()
    rows, keys = [], {}
    for sparsity in shard.take(config.sparsities):
        model = load_model(config, float(sparsity))
        data = dataset if dataset is not None else load_dataset(config.dataset, split=config.split, model=model)
        settings = {**settings_without(config, _RUN_ONLY), "model_key": model_key(model), "data": data.name,
                    "split": data.split, "n_images": len(data)}
        path = sparsity_dir(out, sparsity) / UNIT_FILE if out is not None else None
        row = load_unit(path, settings, "an accuracy record (JSON)") if path is not None else None
        if row is None:
            row = model_accuracy(model, data, config, float(sparsity))
            if path is not None:
                save_unit(path, settings, row)
        rows.append(row)
        keys[f"{float(sparsity):g}"] = settings["model_key"]
        del model
    if not shard.whole:
        return None
    result = AccuracyResult(config, rows, keys, time.perf_counter() - start)
    if out is not None:
        result.save(out)
    return result


__all__ = ["AccuracyConfig", "AccuracyResult", "model_accuracy", "run_accuracy"]
