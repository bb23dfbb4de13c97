"""The replacement level's result: per-layer SAE metrics, the replacement's accuracy and KL, the class
graphs' summaries, the faithfulness curves and AUCs, the spurious-correlation experiment
(``result.json``, one CSV per table, ``replacement.md``, ``faithfulness.png``, ``graph.png``,
``catalogue.png`` and ``spurious.png``)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from analyses.common.results import AnalysisResult, markdown_table
from analyses.replacement.config import ReplacementConfig
from hooked_vit import atomic

CURVE_METRICS = ("probability", "logit", "accuracy")
METHOD_STYLE = {"attribution": "tab:red", "random": "tab:grey", "neuron": "tab:blue"}
SPURIOUS_ACCURACIES = {"original_clean": "original model, clean val", "biased_clean": "biased model, clean val",
                       "biased_swapped": "biased model, marker-swapped val",
                       "ablated_swapped": "marker features at median, swapped",
                       "random_swapped": "as many random latents at median, swapped",
                       "ablated_clean": "marker features at median, clean"}


@dataclass
class ReplacementResult(AnalysisResult):
    """``layers`` (per model and SAE: FVE of CLS/patches/all, L0, dead fraction), ``replacement``
    (accuracy and KL to the model with no, every, each single layer replaced without error nodes),
    ``graphs`` (per class: top nodes, feature and error totals), ``curves`` and ``aucs``
    (faithfulness), ``training`` (seconds, layer settings, last log line), ``catalogue`` (per live
latent: class and spatial entropy, firing frequency, top image:patch pairs), ``spurious`` (per
    model: the spurious-correlation experiment's record), ``seconds`` and ``graph_figures`` (the
    class graph figure copied to ``graph.png``)."""

    CONFIG_CLASS: ClassVar[type] = ReplacementConfig
    config: ReplacementConfig
    layers: list[dict[str, Any]] = field(default_factory=list)
    replacement: list[dict[str, Any]] = field(default_factory=list)
    graphs: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    aucs: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    catalogue: list[dict[str, Any]] = field(default_factory=list)
    spurious: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    graph_figures: list[str] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"layers": self.layers, "replacement": self.replacement, "graphs": self.graphs,
                "catalogue": self.catalogue, "catalogue_summary": self.catalogue_summary(),
                "faithfulness_curves": self.curves, "faithfulness_auc": self.aucs,
                "spurious": self.spurious_rows(), "spurious_features": [
                    {"model": r["model"], "class": r["class"], **f} for r in self.spurious for f in r["marker_features"]]}

    def spurious_rows(self) -> list[dict[str, Any]]:
        """Per model: the marked class, the split, the marker features found and the accuracies."""
        return [{"model": r["model"], "class": r["class"], "train_marked": r["train_marked"],
                 "train_relabelled": r["train_relabelled"], "graph_nodes": r["graph_nodes"],
                 "marker_features": len(r["marker_features"]),
                 "swapped_predicted_as_class": r["swapped_predicted_as_class"], **r["accuracy"]} for r in self.spurious]

    def catalogue_summary(self) -> list[dict[str, Any]]:
        """Per model and layer: live latents, median class and spatial entropy (bits), median frequency."""
        rows = []
        for key in dict.fromkeys((r["model"], r["layer"], r["hook"]) for r in self.catalogue):
            part = [r for r in self.catalogue if (r["model"], r["layer"], r["hook"]) == key]
            medians = {name: float(sorted(r[name] for r in part)[len(part) // 2])
                       for name in ("class_entropy", "position_entropy", "frequency")}
            rows.append({"model": key[0], "hook": key[2], "live": len(part), **medians})
        return rows

    def markdown(self) -> str:
        """The SAE metrics, the replacement's accuracy, the faithfulness AUCs and the class graphs."""
        parts = []
        if self.layers:
            parts += ["Per-layer SAEs (val; FVE in raw activation space):", "",
                      markdown_table(self.layers, ["model", "hook", "k", "d_sae", "fve_cls", "fve_patch", "fve", "l0",
                                                   "dead_fraction"], float_format=".4f")]
        if self.training:
            parts += ["", "Training: " + "; ".join(f"{t['model']} {t['train_seconds']:.0f} s" for t in self.training)]
        if self.replacement:
            parts += ["", "Replacement without error nodes (val accuracy, mean KL(model || replacement)):", "",
                      markdown_table(self.replacement, ["model", "replaced", "accuracy", "kl"], float_format=".4f")]
        if self.catalogue:
            parts += ["", "Feature catalogue (live latents on val; medians; entropies in bits):", "",
                      markdown_table(self.catalogue_summary(), float_format=".3f")]
        if self.aucs:
            grid = ", ".join(f"{f:g}" for f in self.config.fractions)
            parts += ["", (f"Faithfulness AUCs ({self.aucs[0]['n_images']} correctly classified val images; "
                           f"fractions {grid} equally spaced):"), "",
                      markdown_table(self.aucs, ["model", "method", "mode", "logit", "adjusted_logit", "probability",
                                                 "accuracy"], float_format=".4f")]
        for r in self.spurious:
            features = ", ".join(f"L{f['layer']}:{f['latent']} ({f['marker_share']:.2f})" for f in r["marker_features"])
            parts += ["", (f"Spurious correlation ({r['model']}; class {r['class']}; {r['train_marked']} marked train images, "
                           f"{r['train_relabelled']} of them relabelled; marker features among the class graph's "
                           f"{r['graph_nodes']} nodes, with their share on the marker: {features or 'none'}):"), "",
                      markdown_table([{"setting": label, "accuracy": r["accuracy"][key]}
                                      for key, label in SPURIOUS_ACCURACIES.items()], float_format=".4f")]
        if self.graphs:
            parts += ["", "Class graphs (mean node scores over the class's images; top nodes `L<layer>:<latent>`):", "",
                      markdown_table(self.graphs, ["model", "class", "n_images", "top_nodes",
                                                   *[k for k in self.graphs[0] if k.startswith("error_L")]],
                                     float_format=".3f")]
        return "\n".join(parts)

    def plot(self, path: str | os.PathLike | None = None):
        """Faithfulness curves (columns: probability, logit, accuracy; rows: insertion, deletion) of
        the attribution-ranked, random and raw-neuron graphs. Saved to ``path`` (PNG) if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 6), squeeze=False)
        models = list(dict.fromkeys(r["model"] for r in self.curves))
        for row, mode in enumerate(("insertion", "deletion")):
            for col, metric in enumerate(CURVE_METRICS):
                ax = axes[row][col]
                for model in models:
                    for method, colour in METHOD_STYLE.items():
                        points = [r for r in self.curves if r["model"] == model and r["method"] == method
                                  and r["mode"] == mode]
                        if points:
                            ax.plot(range(len(points)), [p[metric] for p in points], marker="o", ms=3, color=colour,
                                    label=f"{method}" + (f" ({model})" if len(models) > 1 else ""))
                ax.set_xticks(range(len(self.config.fractions)), [f"{f:g}" for f in self.config.fractions],
                              rotation=60, fontsize=7)
                ax.set_title(f"{mode}: {metric}")
                ax.set_xlabel("fraction of nodes kept" if mode == "insertion" else "fraction of nodes at the median")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Replacement model faithfulness ({self.config.model}, {self.config.objective})")
        fig.tight_layout()
        if path is not None:
            atomic.save_figure(fig, path, dpi=110, metadata={"Description": self.config_comment()})
            plt.close(fig)
        return fig

    def plot_spurious(self, path: str | os.PathLike | None = None):
        """Per model: the accuracies of the spurious-correlation experiment, and a marker-swapped val
        image beside the summed activation of the marker features per patch. Saved to ``path`` if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(self.spurious), 3, figsize=(13, 3.4 * len(self.spurious)), squeeze=False,
                                 gridspec_kw={"width_ratios": [2.2, 1, 1]})
        for row, r in enumerate(self.spurious):
            ax = axes[row][0]
            keys = list(SPURIOUS_ACCURACIES)
            ax.barh(range(len(keys)), [r["accuracy"][k] for k in keys], color=["tab:green", "tab:blue", "tab:red",
                                                                                "tab:orange", "tab:grey", "tab:cyan"])
            ax.set_yticks(range(len(keys)), [SPURIOUS_ACCURACIES[k] for k in keys], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_xlabel("val top-1")
            ax.set_title(f"{r['model']}: marker with class {r['class']}")
            axes[row][1].imshow(r["example"], cmap="gray")
            axes[row][1].set_title("marker-swapped val image", fontsize=9)
            axes[row][2].imshow(r["heat"], cmap="magma")
            axes[row][2].set_title(f"its {len(r['marker_features'])} marker features, per patch", fontsize=9)
            for ax in axes[row][1:]:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        if path is not None:
            atomic.save_figure(fig, path, dpi=110, metadata={"Description": self.config_comment()})
            plt.close(fig)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        directory = super().save(directory)
        atomic.write_text(directory / "replacement.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        if self.curves:
            self.plot(directory / "faithfulness.png")
        if self.catalogue:
            from analyses.replacement.catalogue import plot_catalogue

            first = self.catalogue[0]
            plot_catalogue(self.catalogue, first["n_classes"], first["n_patches"], directory / "catalogue.png",
                           title=f"Feature catalogue ({self.config.model})")
        if self.spurious:
            self.plot_spurious(directory / "spurious.png")
        for figure in self.graph_figures:
            if (directory / figure).is_file():
                with atomic.atomic_path(directory / "graph.png") as tmp:
                    shutil.copyfile(directory / figure, tmp)
        return directory


__all__ = ["ReplacementResult"]
