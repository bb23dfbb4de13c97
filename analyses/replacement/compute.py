"""Replacement level: the residual replacement model of Kim et al. (NeurIPS 2025) on each model.

Before its units, each model's replacement model is trained (jointly, resumable from its
checkpoint; under ``torchrun`` by every process on its share of each batch, gradients averaged) and
saved to ``<out>/<variant>/rrm/`` unless it is saved there with the same training settings. Units:
``train`` (per-layer FVE/L0/dead and the replacement's accuracy and KL), ``catalogue`` (every live latent's top patches, class and
spatial entropy on the held-out split), ``graphs/class_<c>`` (the attribution graph of class ``c`` over
its correctly classified images, pruned to ``node_budget`` nodes: JSON and figure under
``<out>/<variant>/graphs/``) and ``faithfulness`` (insertion/deletion curves and AUCs for
attribution-ranked, random and raw-neuron nodes) and ``spurious`` (the spurious-correlation
experiment, :mod:`analyses.replacement.spurious`, files under ``<out>/<variant>/spurious/``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from analyses.common.level import Level, Record, Variant, register_level
from analyses.replacement.config import ReplacementConfig
from analyses.replacement.result import ReplacementResult

RRM_DIR = "rrm"
GRAPH_DIR = "graphs"
SPURIOUS_DIR = "spurious"
TRAINING_STATE = "training_state.pt"
# The settings the replacement model itself depends on (a saved one with others is trained again).
TRAINING_FIELDS = ("model", "method", "data", "train_split", "architecture", "schedule", "k", "expansion_factor", "steps",
                   "batch_images", "lr", "lr_decay", "cls_repeats", "aux_coefficient", "dead_steps", "median_images",
                   "objective", "seed", "model_key", "variant")


def patch_thumbnails(model: Any, rm: Any, images: Any, graph: Any) -> dict[tuple[int, int], Any]:
    """For each kept node of ``graph``: the grey-scale neighbourhood (3 x 3 patches) of the patch where
    its latent fires most over ``images``, scaled to [0, 1]."""
    _, layers = rm._clean(model, images)
    prefix, patch = model.cfg.n_prefix_tokens, model.cfg.patch_size
    grid = model.cfg.img_size // patch
    out = {}
    for layer, clean in enumerate(layers):
        for latent in graph.kept_nodes(layer)[:40].tolist():
            acts = clean["z"][:, prefix:, latent]  # [batch patches]
            if float(acts.max()) <= 0:
                continue
            image, position = divmod(int(acts.argmax()), acts.shape[1])
            row, col = divmod(position, grid)
            top, left = max(0, (row - 1) * patch), max(0, (col - 1) * patch)
            crop = images[image, :, top:top + 3 * patch, left:left + 3 * patch].mean(0)
            out[(layer, latent)] = (crop - crop.min()) / (crop.max() - crop.min() + 1e-8)
    return out


@register_level("replacement")
class Replacement(Level):
    """Per model: the ``train`` metrics, the ``catalogue``, one graph unit per class, ``faithfulness``
    and (with a ``spurious_class``) ``spurious``."""

    title = "Residual replacement model"
    paper = "Kim et al. 2025 (NeurIPS), residual replacement model: SAE metrics, circuits, Table 1 faithfulness"
    unit = "train / one class graph / faithfulness"
    Config = ReplacementConfig
    Result = ReplacementResult
    run_only = ("sparsities", "device", "batch_size", "checkpoint_every")
    collective_prepare = True  # under torchrun every process trains the replacement model (data-parallel)
    open_choices = ("architecture", "schedule", "k", "expansion_factor", "steps", "lr", "lr_decay", "cls_repeats",
                    "objective", "median_images", "fractions", "spurious_poison")
    figures = {"catalogue.png": "Live latents across depth: class entropy and spatial entropy per layer",
               "faithfulness.png": "Faithfulness curves: insertion and deletion of attribution-ranked, random and "
                                   "raw-neuron nodes",
               "graph.png": "Attribution graph of the first class (top nodes with the patch where they fire most)",
               "spurious.png": "Spurious correlation: accuracies with and without the marker features, and where "
                               "they fire"}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._rm: tuple[Path, Any] | None = None

    def _classes(self, config: ReplacementConfig) -> list[int]:
        if config.classes is not None:
            return [int(c) for c in config.classes]
        labels = self.dataset(config, config.split).labels
        return sorted({int(v) for v in labels.tolist()})

    def units(self, config: ReplacementConfig) -> list[str]:
        return ["train", "catalogue", *[f"{GRAPH_DIR}/class_{c}" for c in self._classes(config)], "faithfulness",
                *(["spurious"] if config.spurious_class is not None else [])]

    def prepare(self, config: ReplacementConfig, model: Any, variant: Variant, out: Path) -> dict[str, Any]:
        """Train and save the replacement model unless it is saved with the same training settings.
        Under ``torchrun`` every process trains (each on its share of every batch) and waits until
        the first has saved it: the driver prepares a variant on every process while any of its
        units is left (``collective_prepare``)."""
        from analyses.replacement.replacement import MODEL_FILE
        from analyses.common.data_parallel import DataParallel
        from analyses.replacement.training import train_replacement
        from hooked_vit.reading import read_json

        directory = Path(out) / variant.key
        settings = self.settings(config, model, variant)
        identity = {name: settings[name] for name in TRAINING_FIELDS if name in settings}
        saved = directory / RRM_DIR / MODEL_FILE
        if not (saved.is_file() and read_json(saved, "a replacement model's description (JSON)").get(
                "info", {}).get("identity") == identity):
            directory.mkdir(parents=True, exist_ok=True)
            rm = train_replacement(model, self.dataset(config, config.train_split, model), config,
                                   checkpoint=directory / TRAINING_STATE)
            rm.info["identity"] = identity
            parallel = DataParallel.start()
            if parallel.is_main:
                rm.save(directory / RRM_DIR)
            parallel.barrier()
            self._rm = (directory, rm)
        else:
            self._replacement(directory, model)
        return {"config": config, "dir": directory, "variant": variant}

    def _replacement(self, directory: Path, model: Any) -> Any:
        from analyses.replacement.replacement import ReplacementModel

        if self._rm is None or self._rm[0] != directory:
            self._rm = (directory, ReplacementModel.load(directory / RRM_DIR, model))
        return self._rm[1]

    def compute(self, unit: str, model: Any, data: dict[str, Any]) -> dict[str, Any]:
        config, directory = data["config"], data["dir"]
        batch_size = config.batch_size or 64
        val = self.dataset(config, config.split, model)
        images, labels = val.tensors(show_progress=False)
        started = time.perf_counter()
        import torch

        rm = self._replacement(directory, model)
        if unit == "train":
            from analyses.replacement.replacement import layer_metrics

            layers, replacement = layer_metrics(model, rm, images, labels, batch_size)
            return {"layers": layers, "replacement": replacement, "train_seconds": rm.info["train_seconds"],
                    "layer_settings": rm.info["layer_settings"], "log": rm.info["log"]}
        if unit == "spurious":
            from analyses.replacement.spurious import spurious_experiment

            return {**spurious_experiment(model, self.dataset(config, config.train_split, model), val, config,
                                          directory / SPURIOUS_DIR), "seconds": time.perf_counter() - started}
        if unit == "catalogue":
            from analyses.replacement.catalogue import feature_catalogue

            return {"rows": feature_catalogue(model, rm, images, labels, batch_size=batch_size),
                    "n_classes": model.cfg.n_classes, "n_patches": model.cfg.n_patches}
        if unit == "faithfulness":
            table = rm.faithfulness(model, val, config.fractions, n_images=config.faithfulness_images, seed=config.seed,
                                    batch_size=batch_size)
            return {"rows": table.rows, "aucs": table.aucs(), "n_images": table.n_images,
                    "seconds": time.perf_counter() - started}
        target = int(unit.removeprefix(f"{GRAPH_DIR}/class_"))
        with torch.no_grad():
            preds = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
        chosen = torch.nonzero((labels == target) & (preds == labels))[:, 0][:config.graph_images]
        if len(chosen) == 0:
            return {"class": target, "n_images": 0, "top": [], "error": [], "seconds": 0.0}
        graph = rm.attribute(model, images[chosen], target)
        pruned = graph.prune(config.node_budget)
        pruned.meta.update({"class": target, "images": chosen.tolist()})
        pruned.save(directory / GRAPH_DIR / f"class_{target}.json")
        pruned.plot(directory / GRAPH_DIR / f"class_{target}.png",
                    thumbnails=patch_thumbnails(model, rm, images[chosen], pruned))
        top = [{"layer": l, "latent": int(i), "score": float(graph.nodes[l][i])}
               for l in range(len(graph.nodes)) for i in pruned.kept_nodes(l)]
        totals = [{"layer": l, "features": float(graph.nodes[l].sum()), "error": float(graph.error[l])}
                  for l in range(len(graph.nodes))]
        return {"class": target, "n_images": len(chosen), "top": sorted(top, key=lambda r: -r["score"]),
                "totals": totals, "objective_value": graph.meta["objective_value"],
                "seconds": time.perf_counter() - started}

    def combine(self, config: ReplacementConfig, records: list[Record]) -> ReplacementResult:
        layers, replacement, graphs, curves, aucs, training, catalogue, spurious = [], [], [], [], [], [], [], []
        for r in records:
            tag = {"model": r.variant.label, "sparsity": r.variant.sparsity}
            if r.unit == "train":
                layers += [{**tag, **row} for row in r.record["layers"]]
                replacement += [{**tag, **row} for row in r.record["replacement"]]
                training.append({**tag, "train_seconds": r.record["train_seconds"],
                                 "layer_settings": r.record["layer_settings"],
                                 "final": r.record["log"][-1] if r.record["log"] else {}})
            elif r.unit == "catalogue":
                sizes = {"n_classes": r.record["n_classes"], "n_patches": r.record["n_patches"]}
                catalogue += [{**tag, **{k: v for k, v in row.items() if k != "top"}, **sizes,
                               "top": " ".join(f"{i}:{p}" for i, p in row["top"])} for row in r.record["rows"]]
            elif r.unit == "spurious":
                spurious.append({**tag, **r.record})
            elif r.unit == "faithfulness":
                curves += [{**tag, **row} for row in r.record["rows"]]
                aucs += [{**tag, **row, "n_images": r.record["n_images"]} for row in r.record["aucs"]]
            else:
                rec = r.record
                graphs.append({**tag, "class": rec["class"], "n_images": rec["n_images"],
                               "top_nodes": ", ".join(f"L{t['layer']}:{t['latent']} ({t['score']:.2f})"
                                                      for t in rec["top"][:5]),
                               **{f"error_L{t['layer']}": t["error"] for t in rec.get("totals", [])},
                               **{f"features_L{t['layer']}": t["features"] for t in rec.get("totals", [])}})
        return ReplacementResult(config, layers, replacement, graphs, curves, aucs, training, catalogue, spurious,
                                 sum(r.seconds for r in records),
                                 [f"{r.variant.key}/{GRAPH_DIR}/class_{r.record['class']}.png" for r in records
                                  if r.unit.startswith(GRAPH_DIR) and r.record["n_images"]][:1])
