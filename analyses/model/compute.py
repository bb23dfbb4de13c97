"""Model level (IMPACT sec. 3.5 and 4.5, Table 4, Figure 4): attribution maps scored by insertion
and deletion for a dense model and its pruned variants, and the maps of a few images.

Units of one model (``<out>/sparsity_<s>/<unit>.json``): each image chunk ``chunks/<first>``
(``chunk_size`` analysed images from position ``first``), where every method of ``methods``
(:data:`analyses.model.lrp.METHODS`) explains the clean argmax and
:func:`analyses.model.faithfulness.insertion_deletion` scores the map; the random baseline of a
chunk is seeded with ``seed + first``. And the Figure 4 unit ``figure/<classes>``: the first analysed
image of each figure class, shown, and its map under the first non-random method. The result is
combined from these records alone (:class:`~analyses.model.result.ModelResult`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from analyses.common.level import Level, Record, Variant, register_level
from analyses.model.config import KINDS, PERTURBATION_BATCH, ModelConfig
from analyses.model.result import ModelResult
from hooked_vit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from hooked_vit.data import LabelledImages
# torch, the attribution methods and the datasets are imported where used: importing this module
# (to register the level) stays light, so `hooked-vit model --help` answers at once.

CHUNKS = "chunks/"
FIGURE = "figure/"


# ----------------------------------------------------------------------------- images
def select_images(dataset: LabelledImages, config: ModelConfig) -> LabelledImages:
    """The analysed images: ``config.classes`` (default all), ``config.n_images`` of them drawn
    class-balanced with ``config.seed`` (default all, in dataset order)."""
    from hooked_vit.data import calibration_sample

    if config.classes is not None:
        dataset = dataset.select_classes(list(config.classes))
    if len(dataset) == 0:
        raise InvalidArgumentError(f"{dataset!r} has no images to analyse")
    if config.n_images is None:
        return dataset
    if config.n_images > len(dataset):
        raise InvalidArgumentError(f"n_images={config.n_images} but only {len(dataset)} images are available; "
                                   f"choose 1..{len(dataset)} or all (None)")
    return calibration_sample(dataset, config.n_images, seed=config.seed)


def figure_positions(dataset: LabelledImages, classes: Sequence[int | str] | None, n_rows: int = 4) -> list[int]:
    """Positions of the Figure 4 rows: the first analysed image of each of ``classes`` (default the
    first ``n_rows`` present classes)."""
    import torch

    wanted = ([dataset.class_index(c) for c in classes] if classes is not None
              else dataset.present_classes()[:n_rows])
    positions = []
    for c in wanted:
        hits = torch.nonzero(dataset.labels == c).reshape(-1)
        if hits.numel() == 0:
            raise InvalidArgumentError(f"figure class {c!r} has no analysed images; choose among "
                                       f"{dataset.present_classes()}")
        positions.append(int(hits[0]))
    return positions


def figure_unit(config: ModelConfig) -> str:
    """The name of the Figure 4 unit: ``figure/default``, ``figure/<classes>`` (``figure/1,4``), or
    ``figure/<hash>`` when the class names do not make a file name (the figure classes do not
    change the chunks, so each choice has its own unit)."""
    if config.figure_classes is None:
        return f"{FIGURE}default"
    text = ",".join(map(str, config.figure_classes))
    if re.fullmatch(r"[\w.,-]{1,80}", text) and text != "default":
        return f"{FIGURE}{text}"
    return FIGURE + hashlib.sha256(json.dumps(list(config.figure_classes)).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- one unit
def chunk_record(model: nn.Module, images: Tensor, config: ModelConfig, first: int,
                 batch_size: int) -> dict[str, Any]:
    """Per method: per image the insertion/deletion AUCs, the summed curves and wall times."""
    from analyses.model.faithfulness import insertion_deletion
    from analyses.model.lrp import attribution_map

    out: dict[str, Any] = {}
    for method in config.methods:
        start = time.perf_counter()
        maps = attribution_map(method, model, images, None, **config.method_options(method, first)).detach()
        mid = time.perf_counter()
        scores = insertion_deletion(model, images, maps.float(), config.reference, step=config.step,
                                    batch_size=batch_size)
        out[method] = {
            "insertion": scores.insertion_auc.tolist(), "deletion": scores.deletion_auc.tolist(),
            "curve_sums": {k: scores.curves[k].double().sum(0).tolist() for k in KINDS},
            "target": scores.target.tolist(),
            "seconds_maps": mid - start, "seconds_scores": time.perf_counter() - mid,
        }
    return out


def figure_maps(model: nn.Module, images: Tensor, config: ModelConfig) -> list[list[list[float]]]:
    """The maps of the figure images under the first non-random method (``[row][grid][grid]``)."""
    from analyses.model.lrp import attribution_map

    method = config.figure_method()
    maps = attribution_map(method, model, images, None, **config.method_options(method, 0))
    return maps.detach().double().cpu().tolist()


def display_images(model: nn.Module, images: Tensor) -> list:
    """Model-ready images back to ``[row][h][w][rgb]`` in [0, 1] (undoing the normalisation)."""
    import torch

    pre = model.cfg.preprocessing or {}
    mean = torch.tensor(pre.get("mean", [0.0] * 3), dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre.get("std", [1.0] * 3), dtype=torch.float32)[:, None, None]
    shown = (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)
    return (shown * 1000).round().div(1000).tolist()


# ----------------------------------------------------------------------------- combining
def flatten_records(sparsity: float, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (image, method): sparsity, method, position, label, target and the two AUCs."""
    rows = []
    for record in records:
        for method, values in record["methods"].items():
            for i, label in enumerate(record["labels"]):
                rows.append({"sparsity": float(sparsity), "method": method, "image": record["first"] + i,
                             "label": label, "target": values["target"][i],
                             "insertion": values["insertion"][i], "deletion": values["deletion"][i]})
    return rows


def mean_curves(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per method and kind the curve averaged over all images of ``records``."""
    import torch

    n = sum(len(r["labels"]) for r in records)
    out: dict[str, dict[str, list[float]]] = {}
    for method in records[0]["methods"]:
        out[method] = {}
        for kind in KINDS:
            total = torch.stack([torch.tensor(r["methods"][method]["curve_sums"][kind], dtype=torch.float64)
                                 for r in records]).sum(0)
            out[method][kind] = (total / n).tolist()
    return out


# ----------------------------------------------------------------------------- the level
@register_level("model")
class Model(Level):
    """Table 4 and Figure 4: per model, one unit per image chunk (every method's maps scored by
    insertion and deletion) and one unit holding the Figure 4 maps."""

    title = "Model level"
    paper = "Table 4, Figure 4"
    unit = "model x image chunk (every attribution method's maps, insertion and deletion), plus the model's " \
           "Figure 4 maps"
    Config = ModelConfig
    Result = ModelResult
    run_only = ("sparsities", "batch_size", "device", "figure_classes")
    open_choices = ("methods", "reference", "step", "start_layer", "layerscale_rule", "pool_row",
                    "n_images")
    figures: ClassVar[dict[str, str]] = {"figure4.png": "Figure 4: attribution maps of the dense and sparse models",
                                         "curves.png": "insertion and deletion curves"}
    paper_numbers = """| Sparsity | Dense | 10% | 30% | 50% | 70% |
|---|---:|---:|---:|---:|---:|
| Insertion ↑ | 0.600 | 0.703 | 0.714 | 0.706 | 0.663 |
| Deletion ↓ | 0.212 | 0.201 | 0.200 | 0.203 | 0.175 |"""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._counts: dict[tuple, int] = {}
        self._images: dict[tuple, LabelledImages] = {}

    @staticmethod
    def _key(config: ModelConfig) -> tuple:
        return (config.model, config.data, config.split, config.classes, config.n_images, config.seed)

    def images(self, config: ModelConfig, model: nn.Module) -> LabelledImages:
        """The analysed images (:func:`select_images` of ``config.split``), loaded for ``model``
        once per level object and configuration."""
        key = self._key(config)
        if key not in self._images:
            self._images[key] = select_images(self.dataset(config, config.split, model), config)
        return self._images[key]

    def _count(self, config: ModelConfig) -> int:
        """How many images are analysed, known before any model is loaded."""
        key = self._key(config)
        if key in self._images:
            return len(self._images[key])
        if config.n_images is not None:  # checked against the images available when they are loaded
            return config.n_images
        if key not in self._counts:
            self._counts[key] = len(select_images(self.dataset(config, config.split), config))
        return self._counts[key]

    def units(self, config: ModelConfig) -> list[str]:
        """``chunks/<first>`` for every chunk of ``chunk_size`` analysed images, then the Figure 4 unit."""
        return [f"{CHUNKS}{first:06d}" for first in range(0, self._count(config), config.chunk_size)] + \
            [figure_unit(config)]

    def settings(self, config: ModelConfig, model: nn.Module, variant: Variant) -> dict[str, Any]:
        """The config without :attr:`run_only`, the weights, and the analysed images (their dataset,
        split, number and a digest of their positions in the dataset)."""
        images = self.images(config, model)
        indices = json.dumps(images.store_indices.tolist()).encode()
        return {**super().settings(config, model, variant), "dataset": images.name, "split": images.split,
                "n_images": len(images), "store_indices_sha256": hashlib.sha256(indices).hexdigest()}

    def prepare(self, config: ModelConfig, model: nn.Module, variant: Variant, out: Path) -> dict[str, Any]:
        from hooked_vit.data import default_batch_size

        images = self.images(config, model)
        positions = figure_positions(images, config.figure_classes)
        param = next(model.parameters())
        batch_size = config.batch_size or max(PERTURBATION_BATCH, default_batch_size(param.device))
        return {"config": config, "images": images, "positions": positions, "batch_size": batch_size}

    def compute(self, unit: str, model: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
        """A chunk: its positions, labels and per method the AUCs, summed curves and timings. The
        figure unit: the figure images (shown), their labels and maps."""
        config, images = data["config"], data["images"]
        param = next(model.parameters())
        if unit.startswith(FIGURE):
            shown, labels = images.subset(data["positions"]).tensors(show_progress=False)
            return {"images": display_images(model, shown), "positions": data["positions"],
                    "labels": [images.class_names[c] for c in labels.tolist()], "method": config.figure_method(),
                    "maps": figure_maps(model, shown.to(device=param.device, dtype=param.dtype), config)}
        first = int(unit.removeprefix(CHUNKS))
        chunk = images.subset(list(range(first, min(first + config.chunk_size, len(images)))))
        pixels, labels = chunk.tensors(show_progress=False)
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        return {"first": first, "store_indices": chunk.store_indices.tolist(), "labels": labels.tolist(),
                "methods": chunk_record(model, pixels, config, first, data["batch_size"])}

    def combine(self, config: ModelConfig, records: list[Record]) -> ModelResult:
        """Rows, mean curves, timings and Figure 4 maps per model, from the saved units."""
        rows: list[dict[str, Any]] = []
        curves: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        keys: dict[str, str] = {}
        figure: dict[str, Any] = {"maps": {}}
        by_variant: dict[Variant, list[Record]] = {}
        for r in records:
            by_variant.setdefault(r.variant, []).append(r)
        for variant, saved in by_variant.items():
            chunks = [r.record for r in saved if r.unit.startswith(CHUNKS)]
            shown = next(r.record for r in saved if r.unit.startswith(FIGURE))
            if "images" not in figure:
                figure.update(images=shown["images"], positions=shown["positions"], labels=shown["labels"],
                              method=shown["method"])
            label = f"{variant.sparsity:g}"
            rows += flatten_records(variant.sparsity, chunks)
            curves[label] = mean_curves(chunks)
            timings[label] = {m: {"maps": sum(r["methods"][m]["seconds_maps"] for r in chunks),
                                  "scores": sum(r["methods"][m]["seconds_scores"] for r in chunks)}
                              for m in config.methods}
            figure["maps"][label] = shown["maps"]
            keys[label] = saved[0].settings["model_key"]
        return ModelResult(config, rows, curves, figure, timings, keys, sum(r.seconds for r in records))


__all__ = ["Model", "chunk_record", "display_images", "figure_maps", "figure_positions", "figure_unit",
           "flatten_records", "mean_curves", "select_images"]
