"""The transcoders level's figure: per model, the mean contribution score of each source layer per
class (heatmap) and the accuracy as the top-scored layers' terms are removed or kept alone."""

from __future__ import annotations

import os
from typing import Any

from hooked_vit import atomic


def contribution_figure(result: Any, path: str | os.PathLike | None = None):
    """The figure of :meth:`CLTResult.plot`."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = [c["model"] for c in result.contributions]
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 3.4 * len(models)), squeeze=False)
    for (heat, curve), model in zip(axes, models):
        rows = [r for r in result.per_class if r["model"] == model]
        n_layers = len(next(c for c in result.contributions if c["model"] == model)["mean"])
        grid = [[r[f"layer_{l}"] for l in range(n_layers)] for r in rows]
        image = heat.imshow(grid, aspect="auto", cmap="viridis")
        heat.set_xticks(range(n_layers))
        heat.set_yticks(range(len(rows)), [str(r["class"]) for r in rows])
        heat.set_xlabel("source layer")
        heat.set_ylabel("class")
        heat.set_title(f"{model}: mean contribution score")
        fig.colorbar(image, ax=heat)
        points = [c for c in result.curves if c["model"] == model]
        ks = [c["k"] for c in points]
        curve.plot(ks, [100 * c["removal"] for c in points], "o-", label="top-k removed")
        curve.plot(ks, [100 * c["keep"] for c in points], "s-", label="only top-k kept")
        curve.set_xticks(ks)
        curve.set_xlabel("k (layers, by mean score)")
        curve.set_ylabel("accuracy (%)")
        curve.set_title(f"ablation: {result.config.ablation}")
        curve.grid(alpha=0.3)
        curve.legend()
    fig.tight_layout()
    if path is not None:
        atomic.save_figure(fig, path, dpi=110, metadata={"Description": result.config_comment()})
        plt.close(fig)
    return fig


__all__ = ["contribution_figure"]
