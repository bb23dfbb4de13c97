"""The layer level's result: Table 2 (``quality.csv``), the latent metrics per class and their
summary (``per_class.csv``, ``summary.csv``, ``summary.md``), Figure 3 (``figure.png``) and, with a
sweep, Tables 5/6 (``sweep/sweep.csv``, ``sweep/sweep.md``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from analyses.common.labels import sparsity_label
from analyses.common.results import AnalysisResult, markdown_table
from analyses.common.vocabulary import METRIC_LABELS, METRICS
from analyses.layer.config import LayerConfig
from hooked_vit import atomic
from hooked_vit.errors import InvalidArgumentError

SWEEP_DIR = "sweep"


@dataclass
class LayerResult(AnalysisResult):
    """Layer-level numbers: ``quality`` has one row per sparsity (Table 2: NMSE, explained
    variance, dead latents over ``n_tokens`` held-out tokens, L0), ``rows`` one per (sparsity,
    class) with the four metrics averaged over the class's top-K latents (Figure 3), and
    ``latents`` the per-class latent indices and per-latent values; ``sweep`` the rows of the SAE
    sweep (Tables 5/6), saved in ``sweep/``."""

    CONFIG_CLASS: ClassVar[type] = LayerConfig
    config: LayerConfig
    quality: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    latents: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    sweep: list[dict[str, Any]] = field(default_factory=list)

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
        from analyses.common.metrics import metric_summary

        return [{"sparsity": sparsity, **metric_summary([r for r in self.rows if r["sparsity"] == sparsity])}
                for sparsity in sorted({r["sparsity"] for r in self.rows})]

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
        """``result.json``, ``quality.csv``, ``per_class.csv``, ``summary.csv``, ``summary.md``,
        with latent metrics ``figure.png``, and with a sweep ``sweep/`` (``sweep.csv``, ``sweep.md``)."""
        directory = super().save(directory)
        atomic.write_text(directory / "summary.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        if self.rows:
            self.plot(directory / "figure.png")
        if self.sweep:
            sweep = self.sweep_result()
            sweep.save(directory / SWEEP_DIR)
            atomic.write_text(directory / SWEEP_DIR / "sweep.md", sweep.markdown() + "\n")
        return directory

    def sweep_result(self) -> Any:
        """The SAE sweep (Tables 5/6) as a :class:`~analyses.layer.sae_quality.SweepResult`."""
        from analyses.layer.sae_quality import SweepConfig, SweepResult

        c = self.config
        return SweepResult(SweepConfig(base=c.sae, ks=c.sweep_k, expansion_factors=c.sweep_expansion_factor,
                                       tokens=c.sweep_tokens), self.sweep)

    def plot(self, path: str | os.PathLike | None = None):
        """The paper's Figure 3: violins of the per-class values of each metric (panels), one per
        sparsity. Saved to ``path`` (PNG) if given; returns the figure."""
        import matplotlib
        import torch

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


__all__ = ["SWEEP_DIR", "LayerResult"]
