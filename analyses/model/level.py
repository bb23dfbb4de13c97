"""Model level of IMPACT (sec. 3.5 and 4.5): attribution maps scored by insertion and deletion for a
dense model and its pruned variants (Table 4), and the maps of a few images (Figure 4).

Per model (sparsity) and image chunk: each attribution method of ``methods``
(:data:`analyses.model.lrp.METHODS`: ``chefer`` (the paper's), ``attnlrp``, ``cp_lrp``, ``rollout``,
``gradxinput``, ``random``) explains the clean argmax; :func:`analyses.model.faithfulness.insertion_deletion`
scores the map. A chunk's numbers go to ``<out>/sparsity_<s>/chunks/<first>.json`` as soon as they
are known, with the settings that produced them; a rerun skips the chunks already done (resume).
The random baseline of a chunk is seeded with ``seed + first image position``.

The result holds per image and method the two AUCs, the mean curves, the Figure 4 maps (the first
non-random method) and the wall times; it writes ``table4.csv``/``.md``, ``per_image.csv``,
``figure4.png``, ``curves.png`` and ``result.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from analyses.common.ablation import model_key
from analyses.model.faithfulness import REFERENCES, insertion_deletion
from analyses.model.lrp import LAYERSCALE_RULES, METHODS, attribution_map
from analyses.common.defaults import DEFAULT_MODEL, DEFAULT_SPARSITIES  # noqa: F401  (public here)
from analyses.common.variants import ModelFamily, load_model, sparsity_dir
from analyses.common.results import AnalysisResult, markdown_table, settings_without
from analyses.common.units import Shard, load_unit, save_unit
from hooked_vit.atomic import save_figure, write_text
from hooked_vit.data import LabelledImages, calibration_sample, default_batch_size, load_dataset, progress
from hooked_vit.errors import InvalidArgumentError

DEFAULT_METHODS: tuple[str, ...] = ("chefer", "rollout", "random")
KINDS: tuple[str, ...] = ("insertion", "deletion")
_RUN_ONLY = ("sparsities", "batch_size", "device", "figure_classes")
PERTURBATION_BATCH = 256  # default perturbed images per forward: insertion/deletion is forward-bound


@dataclass
class ModelLevelConfig(ModelFamily):
    """Settings of a model-level run.

    ``model`` pruned with ``method`` at each of ``sparsities`` (0 = dense), Wanda calibrated on
    ``n_calib`` train images of ``dataset`` drawn by ``calib_sampling``, then ``finetune_epochs`` of
    masked fine-tuning (``None``: the model preset's protocol, see
    :func:`analyses.common.variants.variant_settings`). Images: ``split`` of ``dataset`` (``"builtin"``: the
    model's own), the ``classes`` given (default all), ``n_images`` of them drawn class-balanced with ``seed``
    (default all, in dataset order). ``methods``: attribution methods (keys of
    :data:`analyses.model.lrp.METHODS`). Chefer options: ``start_layer``, ``layerscale_rule``,
    ``cp_attention``. Insertion/deletion: ``reference`` (:data:`analyses.model.faithfulness.REFERENCES`)
    and ``step`` (pixels per step, default the image width). ``batch_size``: perturbed images per
    forward (default :data:`PERTURBATION_BATCH`). ``chunk_size`` images per saved unit;
    ``figure_classes``: classes of the Figure 4 rows (default the first four present).
    """

    split: str = "val"
    methods: tuple[str, ...] = DEFAULT_METHODS
    classes: tuple[int | str, ...] | None = None
    n_images: int | None = None
    reference: str = "zero"
    step: int | None = None
    start_layer: int = 0
    layerscale_rule: str = "identity"
    cp_attention: bool = False
    figure_classes: tuple[int | str, ...] | None = None
    chunk_size: int = 50
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InvalidArgumentError(f"unknown attribution method(s) {unknown or list(self.methods)}; "
                                       f"choose from {', '.join(METHODS)}")
        if self.reference not in REFERENCES:
            raise InvalidArgumentError(f"unknown reference {self.reference!r}; choose one of {', '.join(REFERENCES)}")
        if self.layerscale_rule not in LAYERSCALE_RULES:
            raise InvalidArgumentError(f"unknown layerscale rule {self.layerscale_rule!r}; choose one of "
                                       f"{', '.join(LAYERSCALE_RULES)}")
        if self.n_images is not None and self.n_images < 1:
            raise InvalidArgumentError(f"n_images must be >= 1 (or None for all), got {self.n_images}")
        if self.chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.start_layer < 0:
            raise InvalidArgumentError(f"start_layer must be >= 0, got {self.start_layer}")
        if self.step is not None and self.step < 1:
            raise InvalidArgumentError(f"step must be >= 1 pixel, got {self.step}")

    def chunk_settings(self) -> dict[str, Any]:
        """What a chunk's numbers depend on (besides the weights and the images)."""
        return settings_without(self, _RUN_ONLY)

    def method_options(self, method: str, first: int) -> dict[str, Any]:
        """Keyword options of ``method`` for the chunk starting at image ``first``."""
        if method == "chefer":
            return {"start_layer": self.start_layer, "layerscale_rule": self.layerscale_rule,
                    "cp_attention": self.cp_attention}
        if method == "rollout":
            return {"start_layer": self.start_layer}
        if method == "random":
            return {"seed": self.seed + first}
        return {}


# ----------------------------------------------------------------------------- images
def select_images(dataset: LabelledImages, config: ModelLevelConfig) -> LabelledImages:
    """The analysed images: ``config.classes`` (default all), ``config.n_images`` of them drawn
    class-balanced with ``config.seed`` (default all, in dataset order)."""
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


# ----------------------------------------------------------------------------- one model
def chunk_record(model: nn.Module, images: Tensor, config: ModelLevelConfig, first: int,
                 batch_size: int) -> dict[str, Any]:
    """Per method: per image the insertion/deletion AUCs, the summed curves and wall times."""
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


def _chunk_path(directory: Path, first: int) -> Path:
    return directory / "chunks" / f"{first:06d}.json"


def model_records(model: nn.Module, dataset: LabelledImages, config: ModelLevelConfig, *,
                  directory: str | os.PathLike | None = None, shard: Shard = Shard(), offset: int = 0,
                  show_progress: bool = True) -> list[dict[str, Any]]:
    """Chunk records of one model, in image order (only ``shard``'s share of the chunks,
    ``shard.take(chunks, offset)``); with ``directory``, each is saved as soon as it is computed and
    chunks saved with the same settings, weights and images are reused (resume)."""
    param = next(model.parameters())
    batch_size = config.batch_size or max(PERTURBATION_BATCH, default_batch_size(param.device))
    settings = {**config.chunk_settings(), "model_key": model_key(model), "dataset": dataset.name,
                "split": dataset.split, "n_images": len(dataset)}
    firsts = shard.take(list(range(0, len(dataset), config.chunk_size)), offset)

    def chunk_settings(first: int) -> dict[str, Any]:
        positions = list(range(first, min(first + config.chunk_size, len(dataset))))
        return {**settings, "store_indices": dataset.store_indices[positions].tolist()}

    records: dict[int, dict[str, Any]] = {}
    for first in firsts:
        if directory is not None:
            saved = load_unit(_chunk_path(Path(directory), first), chunk_settings(first),
                              "a model-level image chunk (JSON)")
            if saved is not None:
                records[first] = saved
    pending = [f for f in firsts if f not in records]
    for first in progress(pending, desc=f"{model.cfg.model_name} image chunks", total=len(pending),
                          enabled=show_progress):
        chunk = dataset.subset(list(range(first, min(first + config.chunk_size, len(dataset)))))
        images, labels = chunk.tensors(show_progress=False)
        images = images.to(device=param.device, dtype=param.dtype)
        record = {"first": first, "store_indices": chunk.store_indices.tolist(), "labels": labels.tolist(),
                  "methods": chunk_record(model, images, config, first, batch_size)}
        records[first] = record
        if directory is not None:
            save_unit(_chunk_path(Path(directory), first), chunk_settings(first), record)
    return [records[f] for f in firsts]


def figure_maps(model: nn.Module, images: Tensor, config: ModelLevelConfig) -> list[list[list[float]]]:
    """The maps of the figure images under the first non-random method (``[row][grid][grid]``)."""
    method = next((m for m in config.methods if m != "random"), config.methods[0])
    maps = attribution_map(method, model, images, None, **config.method_options(method, 0))
    return maps.detach().double().cpu().tolist()


# ----------------------------------------------------------------------------- result
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
    n = sum(len(r["labels"]) for r in records)
    out: dict[str, dict[str, list[float]]] = {}
    for method in records[0]["methods"]:
        out[method] = {}
        for kind in KINDS:
            total = torch.stack([torch.tensor(r["methods"][method]["curve_sums"][kind], dtype=torch.float64)
                                 for r in records]).sum(0)
            out[method][kind] = (total / n).tolist()
    return out


def _label(sparsity: float) -> str:
    return "dense" if sparsity == 0 else f"{sparsity:g}"


@dataclass
class ModelLevelResult(AnalysisResult):
    """Model-level faithfulness: ``rows`` one per (sparsity, image, method) (see
    :func:`flatten_records`); ``curves[sparsity][method][kind]`` mean curves; ``figure``: the
    Figure 4 images (``images`` ``[row][height][width][rgb]`` in [0, 1], ``labels``) and
    ``maps[sparsity]`` ``[row][grid][grid]``; ``timings[sparsity][method]`` seconds spent on maps
    and on insertion/deletion; ``model_keys`` the weights each sparsity was measured on."""

    CONFIG_CLASS: ClassVar[type] = ModelLevelConfig
    config: ModelLevelConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    figure: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sparsities(self) -> list[float]:
        return sorted({r["sparsity"] for r in self.rows})

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def values(self, kind: str, method: str, sparsity: float) -> Tensor:
        """Per-image AUCs of ``kind`` (``"insertion"``/``"deletion"``) for ``method`` at ``sparsity``."""
        if kind not in KINDS:
            raise InvalidArgumentError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        return torch.tensor([r[kind] for r in self.rows if r["method"] == method and r["sparsity"] == sparsity],
                            dtype=torch.float64)

    def summary(self) -> list[dict[str, Any]]:
        """Table 4: per sparsity and method, the number of images and mean/std (population) of the
        insertion and deletion AUCs, and the wall time of maps and of insertion/deletion."""
        out = []
        for sparsity in self.sparsities:
            for method in self.methods:
                row: dict[str, Any] = {"sparsity": sparsity, "method": method}
                for kind in KINDS:
                    values = self.values(kind, method, sparsity)
                    row["n_images"] = values.numel()
                    row[f"{kind}_mean"] = float(values.mean())
                    row[f"{kind}_std"] = float(values.std(correction=0))
                timing = self.timings.get(f"{sparsity:g}", {}).get(method, {})
                row["seconds_maps"] = timing.get("maps", float("nan"))
                row["seconds_scores"] = timing.get("scores", float("nan"))
                out.append(row)
        return out

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"table4": self.summary(), "per_image": self.rows}

    def markdown(self) -> str:
        """Table 4 as the paper lays it out: a row per method and metric, a column per sparsity
        (mean ± std over images)."""
        summary = {(r["method"], r["sparsity"]): r for r in self.summary()}
        rows = []
        for method in self.methods:
            for kind, arrow in (("insertion", "↑"), ("deletion", "↓")):
                row = {"method": method, "metric": f"{kind.capitalize()} {arrow}"}
                for s in self.sparsities:
                    r = summary[(method, s)]
                    row[_label(s)] = f"{r[f'{kind}_mean']:.3f} ± {r[f'{kind}_std']:.3f}"
                rows.append(row)
        n = self.summary()[0]["n_images"] if self.rows else 0
        return markdown_table(rows) + f"\n\n{n} images per model; {self.seconds:.0f} s wall time in total."

    def save(self, directory: str | os.PathLike) -> Path:
        """``result.json``, ``table4.csv``, ``table4.md``, ``per_image.csv``, ``figure4.png``, ``curves.png``."""
        directory = super().save(directory)
        write_text(directory / "table4.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        if self.figure.get("maps"):
            self.plot_figure(directory / "figure4.png")
        self.plot_curves(directory / "curves.png")
        return directory

    def _save_figure(self, fig, path: str | os.PathLike) -> None:
        import matplotlib.pyplot as plt

        save_figure(fig, path, dpi=120, metadata={"Description": self.config_comment()})
        plt.close(fig)

    def plot_figure(self, path: str | os.PathLike | None = None):
        """Figure 4: rows the figure images, columns the input then one heatmap per sparsity
        (bilinearly upsampled, min-max scaled per map, over the image)."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import torch.nn.functional as F

        images = torch.tensor(self.figure["images"], dtype=torch.float32)  # [row h w 3]
        sparsities = sorted(float(s) for s in self.figure["maps"])
        rows, size = images.shape[0], images.shape[1]
        fig, axes = plt.subplots(rows, len(sparsities) + 1, figsize=(1.6 * (len(sparsities) + 1), 1.6 * rows),
                                 squeeze=False)
        for i in range(rows):
            axes[i][0].imshow(images[i].numpy())
            axes[i][0].set_ylabel(str(self.figure["labels"][i]))
            for j, s in enumerate(sparsities):
                m = torch.tensor(self.figure["maps"][f"{s:g}"][i], dtype=torch.float32)[None, None]
                m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
                m = (m - m.min()) / (m.max() - m.min() + 1e-12)
                axes[i][j + 1].imshow(images[i].numpy())
                axes[i][j + 1].imshow(m.numpy(), cmap="jet", alpha=0.5)
                if i == 0:
                    axes[i][j + 1].set_title(_label(s))
        axes[0][0].set_title("input")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{self.figure.get('method', '')} maps, {self.config.model} + {self.config.method}", fontsize=9)
        fig.tight_layout()
        if path is not None:
            self._save_figure(fig, path)
        return fig

    def plot_curves(self, path: str | os.PathLike | None = None):
        """Mean insertion and deletion curves: a panel per kind, a colour per sparsity, a line style
        per method."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        sparsities = sorted(float(s) for s in self.curves)
        colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.9, max(len(sparsities), 1)).tolist())
        styles = ["-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1))]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, kind in zip(axes, KINDS):
            for s, colour in zip(sparsities, colours):
                for m, method in enumerate(self.methods):
                    ys = self.curves[f"{s:g}"][method][kind]
                    xs = torch.linspace(0, 1, len(ys)).tolist()
                    ax.plot(xs, ys, color=colour, linestyle=styles[m % len(styles)],
                            label=f"{_label(s)} {method}")
            ax.set_title(f"{kind} (reference: {self.config.reference})")
            ax.set_xlabel("fraction of pixels " + ("inserted" if kind == "insertion" else "deleted"))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("probability of the explained class")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        if path is not None:
            self._save_figure(fig, path)
        return fig


# ----------------------------------------------------------------------------- entry points
def _display_images(model: nn.Module, images: Tensor) -> list:
    """Model-ready images back to ``[row][h][w][rgb]`` in [0, 1] (undoing the normalisation)."""
    pre = model.cfg.preprocessing or {}
    mean = torch.tensor(pre.get("mean", [0.0] * 3), dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre.get("std", [1.0] * 3), dtype=torch.float32)[:, None, None]
    shown = (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)
    return (shown * 1000).round().div(1000).tolist()


def run_model_level(
    config: ModelLevelConfig,
    out: str | os.PathLike | None = None,
    *,
    model_loader: Callable[[ModelLevelConfig, float], nn.Module] = load_model,
    dataset: LabelledImages | None = None,
    shard: Shard = Shard(),
    show_progress: bool = True,
) -> ModelLevelResult | None:
    """The model level over ``config.sparsities``: each model from ``model_loader(config, s)``,
    its chunks saved under ``sparsity_dir(out, s)`` (resumable), the combined result saved to
    ``out`` when given. ``dataset`` replaces ``config.dataset``/``config.split`` (e.g. for tests).
    With a partial ``shard``, only its share of the (model, chunk) units is computed and saved, and
    nothing is returned."""
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    keys: dict[str, str] = {}
    figure: dict[str, Any] = {"maps": {}}
    images: LabelledImages | None = None
    for index, sparsity in enumerate(config.sparsities):
        sparsity = float(sparsity)
        model = model_loader(config, sparsity)
        if images is None:
            source = dataset if dataset is not None else load_dataset(config.dataset, split=config.split, model=model)
            images = select_images(source, config)
            positions = figure_positions(images, config.figure_classes)
            figure_images, figure_labels = images.subset(positions).tensors(show_progress=False)
            figure.update(images=_display_images(model, figure_images), positions=positions,
                          labels=[images.class_names[c] for c in figure_labels.tolist()],
                          method=next((m for m in config.methods if m != "random"), config.methods[0]))
        directory = sparsity_dir(out, sparsity) if out is not None else None
        records = model_records(model, images, config, directory=directory, shard=shard, offset=index,
                                show_progress=show_progress)
        if not shard.whole:
            continue
        label = f"{sparsity:g}"
        rows += flatten_records(sparsity, records)
        curves[label] = mean_curves(records)
        timings[label] = {m: {"maps": sum(r["methods"][m]["seconds_maps"] for r in records),
                              "scores": sum(r["methods"][m]["seconds_scores"] for r in records)}
                          for m in config.methods}
        param = next(model.parameters())
        figure["maps"][label] = figure_maps(model, figure_images.to(device=param.device, dtype=param.dtype), config)
        keys[label] = model_key(model)
        del model
    if not shard.whole:
        return None
    result = ModelLevelResult(config, rows, curves, figure, timings, keys, time.perf_counter() - start)
    if out is not None:
        result.save(out)
    return result


__all__ = [
    "DEFAULT_METHODS", "ModelLevelConfig", "ModelLevelResult", "chunk_record", "figure_maps", "figure_positions",
    "flatten_records", "load_model", "mean_curves", "model_records", "run_model_level", "select_images",
]
