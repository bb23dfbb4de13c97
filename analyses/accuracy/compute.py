"""Accuracy level (IMPACT Table 1): top-1 and top-5 accuracy of the dense model and each variant the
other levels analyse (the same cached, fine-tuned variants), on the held-out split. One model is one
unit of work (``<out>/sparsity_<s>/model.json``)."""

from __future__ import annotations

import time
from typing import Any

from analyses.accuracy.config import AccuracyConfig
from analyses.accuracy.result import AccuracyResult
from analyses.common.level import Level, Record, register_level


@register_level("accuracy")
class Accuracy(Level):
    """Table 1: one unit per model, its top-1/top-5 on ``config.split``."""

    title = "Accuracy"
    paper = "Table 1"
    unit = "model"
    Config = AccuracyConfig
    Result = AccuracyResult
    run_only = ("sparsities", "batch_size", "device")
    open_choices = ("method", "finetune_epochs", "n_calib", "calib_sampling", "split")
    paper_numbers = """| Method | Metric | 0.0 (Dense) | 0.1 | 0.3 | 0.5 | 0.7 | 0.8 | 0.9 |
|---|---|---:|---:|---:|---:|---:|---:|---:|
| Magnitude | Top-1 | 0.8371 | 0.8152 | 0.8173 | 0.8159 | 0.8026 | 0.7661 | 0.5517 |
|  | Top-5 | 0.9655 | 0.9565 | 0.9572 | 0.9563 | 0.9498 | 0.9313 | 0.7873 |
| Wanda | Top-1 | 0.8371 | 0.8154 | 0.8174 | 0.8158 | 0.8044 | 0.7687 | 0.6151 |
|  | Top-5 | 0.9655 | 0.9563 | 0.9564 | 0.9565 | 0.9510 | 0.9343 | 0.8426 |"""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._loaded: tuple[tuple, Any] | None = None  # (model, data, split) -> the images of the model in hand

    def settings(self, config: AccuracyConfig, model: Any, variant: Any) -> dict[str, Any]:
        """The driver's settings and the measured images (name, split, count)."""
        data = self._images(config, model)
        return {**super().settings(config, model, variant), "dataset": data.name, "split": data.split,
                "n_images": len(data)}

    def prepare(self, config: AccuracyConfig, model: Any, variant: Any, out: Any) -> dict[str, Any]:
        return {"config": config, "variant": variant, "data": self._images(config, model)}

    def _images(self, config: AccuracyConfig, model: Any) -> Any:
        """``config.split`` for ``model``, loaded once for both :meth:`settings` and :meth:`prepare`."""
        key = (id(model), config.data, config.split)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = (key, self.dataset(config, config.split, model))
        return self._loaded[1]

    def compute(self, unit: str, model: Any, data: dict[str, Any]) -> dict[str, Any]:
        """The model's row of :class:`AccuracyResult`."""
        from hooked_vit.evaluation import evaluate

        config, images = data["config"], data["data"]
        start = time.perf_counter()
        metrics = evaluate(model, images, batch_size=config.batch_size, progress=False)
        info = getattr(model, "pruning_info", None)
        return {"method": config.method, "sparsity": data["variant"].sparsity,
                "overall_sparsity": float(info.overall_sparsity) if info is not None else 0.0,
                "top1": float(metrics["top1"]), "top5": float(metrics["top5"]), "loss": float(metrics["loss"]),
                "n": int(metrics["n"]), "seconds": time.perf_counter() - start}

    def combine(self, config: AccuracyConfig, records: list[Record]) -> AccuracyResult:
        return AccuracyResult(config, [r.record for r in records],
                              {f"{r.variant.sparsity:g}": r.settings["model_key"] for r in records},
                              sum(r.seconds for r in records))
