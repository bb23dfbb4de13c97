"""The MIS level's result: per model variant, unit kind and block the MIS summary (``mis_table.csv``:
mean, median, share of units above 0.8, over the non-constant units), neurons vs dictionary latents
(SAE, replacement-model SAE, CLT) at each block where such latents were scored (``neurons_vs_sae.csv``), every unit's MIS (``result.json``), ``mis.md`` and the
figure MIS vs depth (``mis_vs_depth.png``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from analyses.common.results import AnalysisResult, markdown_table
from analyses.mis.config import DICTIONARY_KINDS, MISConfig
from hooked_vit import atomic

SUMMARY = ("model", "sparsity", "kind", "layer", "hook_name", "unit_kind", "n_units", "n_constant", "n_tied", "mean",
           "median", "share_above_0.8", "mean_untied")


@dataclass
class MISResult(AnalysisResult):
    """``rows``: one per variant and unit of work (its summary, ``mis`` per unit, ``constant``
    flags, the backend and temperature); ``model_keys`` per sparsity; ``seconds`` of compute."""

    CONFIG_CLASS: ClassVar[type] = MISConfig
    config: MISConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> list[dict[str, Any]]:
        """The MIS table: one row per variant, unit kind and block."""
        return [{k: row.get(k) for k in SUMMARY} for row in self.rows]

    def neurons_vs_sae(self) -> list[dict[str, Any]]:
        """Neurons vs dictionary latents: at each variant's blocks with latents of a dictionary (``sae``,
        ``rrm``, ``clt``), those rows first, then every other unit kind scored at the same block."""
        blocks = dict.fromkeys((r["model"], r["layer"]) for r in self.rows if r["kind"] in DICTIONARY_KINDS)
        table = []
        for model, layer in blocks:
            same = [r for r in self.rows if r["model"] == model and r["layer"] == layer]
            table += [{k: r.get(k) for k in SUMMARY} for r in sorted(same, key=lambda r: r["kind"] not in DICTIONARY_KINDS)]
        return table

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"mis_table": self.summary(), "neurons_vs_sae": self.neurons_vs_sae()}

    def markdown(self) -> str:
        """The MIS table and the neurons-vs-SAE comparison, with the backend and settings."""
        c = self.config
        backend = self.rows[0]["similarity"] if self.rows else c.similarity
        temperature = f"temperature {self.rows[0]['temperature'] if self.rows else c.temperature:.4g}"
        if c.human_csv is not None:
            temperature += f" (refit on the human answers of {c.human_csv})"
        head = (f"MIS per unit kind and block ({c.n_tasks} tasks per unit, {c.n_references} references per side "
                f"from the {c.quantile:g} quantile of the {c.split} split, position {c.position}, similarity "
                f"{backend}, {temperature}); mean / median / share above 0.8 over the non-constant units "
                "(n_tied: the sparse units among them whose max pool reaches their min pool's activation, "
                "ties drawn at random; mean_untied: the mean without them).")
        columns = ("model", "kind", "layer", "n_units", "n_constant", "n_tied", "mean", "median", "share_above_0.8",
                   "mean_untied")
        text = f"{head}\n\n{markdown_table(self.summary(), columns)}"
        if self.neurons_vs_sae():
            text += f"\n\nNeurons vs dictionary latents (sae, rrm, clt) at the same block:\n\n{markdown_table(self.neurons_vs_sae(), columns)}"
        return text + f"\n\n{self.seconds:.0f} s of compute in total."

    def plot(self, directory: str | os.PathLike) -> list[Path]:
        """``mis_vs_depth.png``: per unit kind, mean MIS vs block, one line per variant."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        kinds = sorted({r["kind"] for r in self.rows if r["kind"] != "sae"})
        fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(3.6 * max(1, len(kinds)), 3.0), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for model in dict.fromkeys(r["model"] for r in self.rows):
                points = sorted((r["layer"], r["mean"]) for r in self.rows if r["kind"] == kind and r["model"] == model)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
                saes = [r for r in self.rows if r["kind"] == "sae" and r["model"] == model]
                for r in saes if kind == "resid" else ():
                    ax.scatter([r["layer"]], [r["mean"]], marker="*", s=80, color=ax.lines[-1].get_color())
            ax.set_title(kind + (" (* SAE latents)" if kind == "resid" else ""), fontsize=9)
            ax.set_xticks(sorted({r["layer"] for r in self.rows if r["kind"] == kind}))
            ax.set_xlabel("block")
            ax.set_ylim(0.45, 1.0)
        axes[0][0].set_ylabel("mean MIS")
        if axes[0][-1].lines:
            axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = Path(directory) / "mis_vs_depth.png"
        atomic.save_figure(fig, path, dpi=110, metadata={"Description": self.config_comment()})
        plt.close(fig)
        return [path]

    def save(self, directory: str | os.PathLike) -> Path:
        directory = super().save(directory)
        atomic.write_text(directory / "mis.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        self.plot(directory)
        return directory
