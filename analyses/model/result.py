"""The model level's result: Table 4 (``table4.csv``/``table4.md``), the per-image AUCs
(``per_image.csv``), Figure 4 (``figure4.png``), the mean curves (``curves.png``) and ``result.json``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from analyses.common.labels import sparsity_label
from analyses.common.results import AnalysisResult, markdown_table
from analyses.model.config import KINDS, ModelConfig
from hooked_vit.atomic import write_text
from hooked_vit.errors import InvalidArgumentError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class ModelResult(AnalysisResult):
    """Model-level faithfulness: ``rows`` one per (sparsity, image, method) (see
    :func:`analyses.model.compute.flatten_records`); ``curves[sparsity][method][kind]`` mean curves;
    ``figure``: the Figure 4 images (``images`` ``[row][height][width][rgb]`` in [0, 1], ``labels``)
    and ``maps[sparsity]`` ``[row][grid][grid]``; ``timings[sparsity][method]`` seconds spent on maps
    and on insertion/deletion; ``model_keys`` the weights each sparsity was measured on."""

    CONFIG_CLASS: ClassVar[type] = ModelConfig
    config: ModelConfig
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
        import torch

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
                    row[sparsity_label(s)] = f"{r[f'{kind}_mean']:.3f} ± {r[f'{kind}_std']:.3f}"
                rows.append(row)
        n = self.summary()[0]["n_images"] if self.rows else 0
        return markdown_table(rows) + f"\n\n{n} images per model; {self.seconds:.0f} s wall time in total."

    def plot(self, directory: str | os.PathLike) -> list[Path]:
        """``figure4.png`` (when the result holds maps) and ``curves.png`` in ``directory``."""
        from analyses.model.figures import plot_curves, plot_figure4

        directory = Path(directory)
        written = []
        if self.figure.get("maps"):
            plot_figure4(self, directory / "figure4.png")
            written.append(directory / "figure4.png")
        plot_curves(self, directory / "curves.png")
        return [*written, directory / "curves.png"]

    def save(self, directory: str | os.PathLike) -> Path:
        """``result.json``, ``table4.csv``, ``table4.md``, ``per_image.csv``, ``figure4.png``, ``curves.png``."""
        directory = super().save(directory)
        write_text(directory / "table4.md", f"<!-- {self.config_comment()} -->\n\n{self.markdown()}\n")
        self.plot(directory)
        return directory


__all__ = ["ModelResult"]
