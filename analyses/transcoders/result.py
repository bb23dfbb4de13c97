"""The transcoders level's result: per-layer quality (``quality.csv``), replacement accuracy and KL
(``replacement.csv``), training summaries (``training.csv``), contribution scores per class
(``per_class.csv``) and the removal / keep-top-k curves (``curves.csv``), ``summary.md`` and the
figure ``contributions.png``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from analyses.common.results import AnalysisResult, markdown_table
from analyses.transcoders.config import CLTConfig
from hooked_vit import atomic

KIND_LABELS = {"clt": "CLT", "plt": "per-layer transcoders", "sae": "per-layer SAEs"}


@dataclass
class CLTResult(AnalysisResult):
    """Rows per model (``model``, ``sparsity``): ``quality`` one per (dictionary ``kind``, layer) with
    cosine, FVU, R2, MSE, L0, dead fraction; ``replacement`` one per (kind, replacement setting) with
    accuracy, its change from the model's and KL; ``training`` one per kind (seconds, steps,
    parameters, last training FVU); ``contributions`` one per model (mean score per source layer,
    the ranking, the replaced model's accuracy), ``per_class`` (mean score per class and layer) and
    ``curves`` (accuracy with the top-``k`` layers removed / kept)."""

    CONFIG_CLASS: ClassVar[type] = CLTConfig
    config: CLTConfig
    quality: list[dict[str, Any]] = field(default_factory=list)
    replacement: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    contributions: list[dict[str, Any]] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"quality": self.quality, "replacement": self.replacement, "training": self.training,
                "per_class": self.per_class, "curves": self.curves}

    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.quality + self.contributions))

    def mean_fvu(self, model: str, kind: str = "clt") -> float:
        """Mean FVU over layers of ``model``'s dictionary ``kind``."""
        values = [r["fvu"] for r in self.quality if r["model"] == model and r["kind"] == kind]
        return sum(values) / len(values)

    def quality_table(self, model: str) -> str:
        """Per layer: cosine / R2 / L0 / dead fraction of each dictionary."""
        rows = []
        for q in (r for r in self.quality if r["model"] == model):
            rows.append({"layer": q["layer"], "dictionary": KIND_LABELS[q["kind"]], "cosine ↑": f"{q['cosine']:.3f}",
                         "R2 ↑": f"{q['r2']:.3f}", "FVU ↓": f"{q['fvu']:.4f}", "L0": f"{q['l0']:.1f}",
                         "dead ↓": f"{q['dead_fraction']:.3f}"})
        rows.sort(key=lambda r: (r["layer"], list(KIND_LABELS.values()).index(r["dictionary"])))
        return markdown_table(rows)

    def replacement_table(self, model: str) -> str:
        """Accuracy (change) and KL per replacement setting, one column pair per dictionary."""
        kinds = list(dict.fromkeys(r["kind"] for r in self.replacement if r["model"] == model))
        settings = list(dict.fromkeys(r["setting"] for r in self.replacement if r["model"] == model))
        rows = []
        for setting in settings:
            row = {"MLP outputs replaced": setting}
            for kind in kinds:
                r = next(r for r in self.replacement if r["model"] == model and r["kind"] == kind
                         and r["setting"] == setting)
                row[f"{kind.upper()} acc. (%)"] = f"{100 * r['accuracy']:.2f} ({100 * r['delta']:+.2f})"
                row[f"{kind.upper()} KL"] = f"{r['kl']:.4f}" if r["kl"] >= 1e-3 or r["kl"] == 0 else f"{r['kl']:.1e}"
            rows.append(row)
        return markdown_table(rows)

    def contribution_table(self, model: str) -> str:
        """Mean score per source layer, then the removal / keep-top-k accuracies."""
        found = next(c for c in self.contributions if c["model"] == model)
        text = markdown_table([{"source layer": l, "mean score": f"{s:.3f}", "rank": found["ranking"].index(l) + 1}
                               for l, s in enumerate(found["mean"])])
        curves = [{"k": c["k"], "top-k layers": c["layers"] or "-",
                   "acc. top-k removed (%)": f"{100 * c['removal']:.2f}", "acc. only top-k kept (%)": f"{100 * c['keep']:.2f}"}
                  for c in self.curves if c["model"] == model]
        return text + "\n\n" + markdown_table(curves)

    def markdown(self) -> str:
        parts = []
        for model in self.models():
            mean = {kind: self.mean_fvu(model, kind) for kind in self.config.kinds
                    if any(r["model"] == model and r["kind"] == kind for r in self.quality)}
            parts.append(f"**{model}**: mean FVU over layers " + ", ".join(f"{KIND_LABELS[k]} {v:.4f}"
                                                                          for k, v in mean.items()))
            if any(r["model"] == model for r in self.quality):
                parts += ["Per-layer reconstruction (held-out tokens):", self.quality_table(model),
                          "Replacement (accuracy in %, change from the model's; KL(model || replaced)):",
                          self.replacement_table(model)]
            if any(c["model"] == model for c in self.contributions):
                parts += [f"Contribution scores (ablation: {self.config.ablation}) and curves:",
                          self.contribution_table(model)]
        return "\n\n".join(parts)

    def save(self, directory: str | os.PathLike) -> Path:
        directory = super().save(directory)
        atomic.write_text(directory / "summary.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        if self.contributions:
            self.plot(directory / "contributions.png")
        return directory

    def plot(self, path: str | os.PathLike | None = None):
        """Per model: heatmap of the mean contribution score (class x source layer) and the removal /
        keep-top-k accuracy curves. Saved to ``path`` (PNG) if given; returns the figure."""
        from analyses.transcoders.figures import contribution_figure

        return contribution_figure(self, path)


__all__ = ["KIND_LABELS", "CLTResult"]
