"""The circuit level's result: Table 3 (and Table 7 for a k sweep), the per-class rows and the
figures (``result.json``, ``per_class.csv``, ``table3.csv/.md``, ``table7.csv/.md``, ``metrics.png``,
``heatmap.png``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from analyses.circuit.config import CircuitConfig, resolve_k
from analyses.common.labels import RANDOM_LABEL
from analyses.common.results import AnalysisResult, markdown_table
from hooked_vit import atomic

SUMMARY_METRICS: tuple[str, ...] = ("node_frac", "edge_frac", "acc", "acc_full", "acc_ablated", "ncq", "ncq_eq12")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    import statistics

    return (statistics.fmean(values), statistics.pstdev(values)) if values else (float("nan"), float("nan"))


@dataclass
class CircuitResult(AnalysisResult):
    """Circuit-level results: ``rows`` has one entry per (model, k, class) with the circuit's
    metrics (see :func:`analyses.circuit.discovery.circuit_metrics`) and its active fraction per
    site (``site_fractions``); ``model_keys`` names the weights of each model label."""

    CONFIG_CLASS: ClassVar[type] = CircuitConfig
    config: CircuitConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    def table3_k(self, label: str) -> float:
        """The k of ``label``'s Table 3 row (its preset or ``config.k``)."""
        if label == RANDOM_LABEL:
            return resolve_k(self.config, 0.0)
        sparsity = next(r["sparsity"] for r in self.rows if r["model"] == label)
        return resolve_k(self.config, sparsity)

    def select(self, label: str, k: float) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["model"] == label and r["k"] == k]

    def summary_row(self, label: str, k: float) -> dict[str, Any]:
        rows = self.select(label, k)
        out: dict[str, Any] = {"model": label, "k": k, "n_classes": len(rows)}
        for metric in SUMMARY_METRICS:
            out[f"{metric}_mean"], out[f"{metric}_std"] = _mean_std([r[metric] for r in rows])
        out["n_collapsed"] = sum(bool(r["collapsed"]) for r in rows)
        return out

    def table3(self) -> list[dict[str, Any]]:
        """Per model at its k: mean and std over classes of every metric, and the collapsed count."""
        return [self.summary_row(label, self.table3_k(label)) for label in self.models]

    def table7(self) -> list[dict[str, Any]]:
        """Per model and swept k (``config.sweep_k``): the same summary."""
        return [self.summary_row(label, float(k)) for label in self.models for k in (self.config.sweep_k or ())
                if self.select(label, float(k))]

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        per_class = [{k: v for k, v in r.items() if k != "site_fractions"} for r in self.rows]
        tables = {"per_class": per_class, "table3": self.table3()}
        if self.config.sweep_k:
            tables["table7"] = self.table7()
        return tables

    def markdown(self, rows: Sequence[dict[str, Any]] | None = None) -> str:
        """Table 3 (or ``rows``) in the paper's form, in %: Node, Size, Acc, NCQ, plus the full
        model's and the complement's accuracy, NCQ as eq. 12 and the collapsed classes."""
        def pm(row: dict[str, Any], metric: str, scale: float = 100.0, digits: int = 2) -> str:
            return f"{scale * row[f'{metric}_mean']:.{digits}f} ± {scale * row[f'{metric}_std']:.{digits}f}"

        rows = self.table3() if rows is None else rows
        return markdown_table([{
            "Model": r["model"], "k": f"{r['k']:g}", "classes": r["n_classes"], "Node (%)": pm(r, "node_frac"),
            "Size (%)": pm(r, "edge_frac"), "Acc. (%)": pm(r, "acc"), "NCQ": pm(r, "ncq", 1.0, 3),
            "Acc. full (%)": pm(r, "acc_full"), "Ablated acc. (%)": pm(r, "acc_ablated"),
            "NCQ eq. 12": pm(r, "ncq_eq12", 1.0, 3), "collapsed": r["n_collapsed"],
        } for r in rows])

    def plot(self, directory: str | os.PathLike) -> list[Path]:
        """``metrics.png`` and ``heatmap.png`` in ``directory``."""
        from analyses.circuit.figures import plot_heatmap, plot_metrics

        directory = Path(directory)
        plot_metrics(self, directory / "metrics.png")
        plot_heatmap(self, directory / "heatmap.png")
        return [directory / "metrics.png", directory / "heatmap.png"]

    def save(self, directory: str | os.PathLike) -> Path:
        """``result.json``, ``per_class.csv``, ``table3.csv/.md``, ``table7.csv/.md`` (k sweep),
        ``metrics.png`` and ``heatmap.png``."""
        directory = super().save(directory)
        header = f"<!-- {self.config_comment()} -->\n\n"
        atomic.write_text(directory / "table3.md", header + self.markdown() + "\n")
        if self.config.sweep_k:
            atomic.write_text(directory / "table7.md", header + self.markdown(self.table7()) + "\n")
        self.plot(directory)
        return directory


__all__ = ["CircuitResult", "SUMMARY_METRICS"]
