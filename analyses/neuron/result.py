"""The neuron level's result: per (sparsity, class, block) the four metrics over the top-K units
(``per_class.csv``), their summary over classes (``summary.csv``/``summary.md``), the same per unit
type (``per_type.csv``, ``summary_by_type.csv``) and the paper's Figure 2 (``figure.png``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from analyses.common.labels import sparsity_label
from analyses.common.results import AnalysisResult, markdown_table
from analyses.common.vocabulary import METRIC_LABELS, METRICS
from analyses.neuron.config import NeuronConfig
from hooked_vit import atomic
from hooked_vit.errors import InvalidArgumentError


def flatten_records(sparsity: float, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (class, block): sparsity, block, class, class_name, n_images and the metrics."""
    return [{"sparsity": float(sparsity), "block": int(b), "class": r["class"], "class_name": r["class_name"],
             "n_images": r["n_images"], **{m: values[m] for m in METRICS}}
            for r in records for b, values in r["blocks"].items()]


def flatten_type_records(sparsity: float, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (class, block, unit type) of the joint top-K: ``n_units`` of that type and the
    metrics over them (``None`` when the type has no unit in the top-K)."""
    return [{"sparsity": float(sparsity), "block": int(b), "class": r["class"], "unit_type": site,
             **{key: values[key] for key in ("n_units", *METRICS)}}
            for r in records for b, block in r["blocks"].items() for site, values in block.get("by_type", {}).items()]


UNIT_TYPE_LABELS = {"mlp_act": "MLP neurons", "attn_head": "heads"}


@dataclass
class NeuronResult(AnalysisResult):
    """Neuron-level metrics: ``rows`` has one entry per (sparsity, class, block) with the four
    metrics averaged over that class and block's top-K units (see :func:`flatten_records`);
    ``model_keys`` maps each sparsity (as a string) to the weights it was measured on;
    ``type_rows`` the same metrics per unit type of the joint top-K (:func:`flatten_type_records`)."""

    CONFIG_CLASS: ClassVar[type] = NeuronConfig
    config: NeuronConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    type_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def blocks(self) -> list[int]:
        return sorted({r["block"] for r in self.rows})

    @property
    def sparsities(self) -> list[float]:
        return sorted({r["sparsity"] for r in self.rows})

    def values(self, metric: str, block: int, sparsity: float) -> list[float]:
        """Per-class values of ``metric`` at ``block`` and ``sparsity``."""
        if metric not in METRICS:
            raise InvalidArgumentError(f"unknown metric {metric!r}; metrics are {METRICS}")
        return [r[metric] for r in self.rows if r["block"] == block and r["sparsity"] == sparsity]

    def summary(self) -> list[dict[str, Any]]:
        """Per block and sparsity: number of classes and mean/std (population) of each metric."""
        from analyses.common.metrics import metric_summary

        return [{"block": block, "sparsity": sparsity,
                 **metric_summary([r for r in self.rows if r["block"] == block and r["sparsity"] == sparsity])}
                for block in self.blocks for sparsity in self.sparsities]

    def summary_by_type(self) -> list[dict[str, Any]]:
        """Per block, sparsity and unit type: the classes whose top-K holds units of that type, their
        mean number of such units, and mean/std (population, over those classes) of each metric."""
        from analyses.common.metrics import metric_summary

        out = []
        keys = dict.fromkeys((r["block"], r["sparsity"], r["unit_type"]) for r in self.type_rows)
        for block, sparsity, unit_type in sorted(keys):
            rows = [r for r in self.type_rows if (r["block"], r["sparsity"], r["unit_type"]) == (block, sparsity, unit_type)]
            stats = metric_summary([r for r in rows if r["n_units"]])
            out.append({"block": block, "sparsity": sparsity, "unit_type": unit_type, "n_classes": stats.pop("n_classes"),
                        "n_units_mean": sum(r["n_units"] for r in rows) / len(rows), **stats})
        return out

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"per_class": self.rows, "summary": self.summary(), "per_type": self.type_rows,
                "summary_by_type": self.summary_by_type()}

    def markdown(self) -> str:
        """The summary as a markdown table (mean ± std over classes), then the same per unit type."""
        rows = [{"block": r["block"], "sparsity": sparsity_label(r["sparsity"]),
                 "classes": r["n_classes"],
                 **{METRIC_LABELS[m]: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS}}
                for r in self.summary()]
        text = markdown_table(rows)
        if self.type_rows:
            rows = [{"block": r["block"], "sparsity": sparsity_label(r["sparsity"]),
                     "units": UNIT_TYPE_LABELS.get(r["unit_type"], r["unit_type"]),
                     "of top-K (mean)": f"{r['n_units_mean']:.1f}", "classes": r["n_classes"],
                     **{METRIC_LABELS[m]: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS}}
                    for r in self.summary_by_type()]
            text += "\n\nThe same top-K split by unit type (ablation impact: only that type's units ablated):\n\n"
            text += markdown_table(rows)
        return text

    def save(self, directory: str | os.PathLike) -> Path:
        """``result.json``, ``per_class.csv``, ``summary.csv``, ``summary.md`` and ``figure.png``."""
        directory = super().save(directory)
        atomic.write_text(directory / "summary.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        self.plot(directory / "figure.png")
        return directory

    def plot(self, path: str | os.PathLike | None = None):
        """The paper's Figure 2: violins of the per-class values, metrics (rows) x blocks
        (columns), one colour per sparsity. Saved to ``path`` (PNG) if given; returns the figure."""
        import matplotlib
        import torch

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        blocks, sparsities = self.blocks, self.sparsities
        colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.9, max(len(sparsities), 1)).tolist())
        fig, axes = plt.subplots(len(METRICS), len(blocks), figsize=(3.2 * len(blocks) + 1, 2.4 * len(METRICS)),
                                 squeeze=False, sharey="row")
        for i, metric in enumerate(METRICS):
            for j, block in enumerate(blocks):
                ax = axes[i][j]
                for x, (sparsity, colour) in enumerate(zip(sparsities, colours)):
                    values = self.values(metric, block, sparsity)
                    if len(values) >= 2 and max(values) - min(values) > 1e-12:
                        parts = ax.violinplot([values], positions=[x], widths=0.8, showmeans=True)
                        for body in parts["bodies"]:
                            body.set_facecolor(colour)
                            body.set_alpha(0.7)
                        for key in ("cmeans", "cmins", "cmaxes", "cbars"):
                            parts[key].set_color(colour)
                    elif values:  # a single value or all equal: a KDE is undefined, draw the points
                        ax.scatter([x] * len(values), values, color=colour, s=12)
                ax.set_xticks(range(len(sparsities)), [sparsity_label(s) for s in sparsities])
                ax.grid(alpha=0.3, axis="y")
                if i == 0:
                    ax.set_title(f"block {block}")
                if j == 0:
                    ax.set_ylabel(METRIC_LABELS[metric])
                if i == len(METRICS) - 1:
                    ax.set_xlabel("sparsity")
        config = self.config
        fig.suptitle(f"Neuron level: {config.model}, {config.method}, top-{config.top_k} "
                     f"{'+'.join(config.sites)} units per class ({config.split} split)")
        fig.tight_layout()
        if path is not None:
            atomic.save_figure(fig, path, dpi=120, metadata={"Description": self.config_comment()})
            plt.close(fig)
        return fig


__all__ = ["UNIT_TYPE_LABELS", "NeuronResult", "flatten_records", "flatten_type_records"]
