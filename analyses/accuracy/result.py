"""The accuracy level's result: Table 1 (``table1.csv``/``table1.md``, ``result.json``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from analyses.accuracy.config import AccuracyConfig
from analyses.common.results import AnalysisResult
from hooked_vit import atomic


@dataclass
class AccuracyResult(AnalysisResult):
    """One row per model: method, sparsity, measured overall sparsity, top-1/top-5 (fractions),
    loss and the number of images."""

    CONFIG_CLASS: ClassVar[type] = AccuracyConfig
    config: AccuracyConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"table1": self.rows}

    def markdown(self) -> str:
        """The paper's Table 1 layout: Top-1 and Top-5 rows, one column per sparsity."""
        from hooked_vit.pruning.sweep import markdown_table

        return markdown_table(self.rows, tuple(sorted({float(r["sparsity"]) for r in self.rows})))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = super().save(directory)
        atomic.write_text(directory / "table1.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        return directory
