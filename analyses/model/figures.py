"""The model level's figures, drawn from a :class:`~analyses.model.result.ModelResult` alone:
Figure 4 (the maps of a few images per model) and the mean insertion/deletion curves."""

from __future__ import annotations

import os
from typing import Any

import torch

from analyses.common.labels import sparsity_label
from analyses.model.config import KINDS
from hooked_vit.atomic import save_figure


def _save(result: Any, fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    save_figure(fig, path, dpi=120, metadata={"Description": result.config_comment()})
    plt.close(fig)


def plot_figure4(result: Any, path: str | os.PathLike | None = None):
    """Figure 4: rows the figure images, columns the input then one heatmap per sparsity
    (bilinearly upsampled, min-max scaled per map, over the image)."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    figure = result.figure
    images = torch.tensor(figure["images"], dtype=torch.float32)  # [row h w 3]
    sparsities = sorted(float(s) for s in figure["maps"])
    rows, size = images.shape[0], images.shape[1]
    fig, axes = plt.subplots(rows, len(sparsities) + 1, figsize=(1.6 * (len(sparsities) + 1), 1.6 * rows),
                             squeeze=False)
    for i in range(rows):
        axes[i][0].imshow(images[i].numpy())
        axes[i][0].set_ylabel(str(figure["labels"][i]))
        for j, s in enumerate(sparsities):
            m = torch.tensor(figure["maps"][f"{s:g}"][i], dtype=torch.float32)[None, None]
            m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            axes[i][j + 1].imshow(images[i].numpy())
            axes[i][j + 1].imshow(m.numpy(), cmap="jet", alpha=0.5)
            if i == 0:
                axes[i][j + 1].set_title(sparsity_label(s))
    axes[0][0].set_title("input")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{figure.get('method', '')} maps, {result.config.model} + {result.config.method}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        _save(result, fig, path)
    return fig


def plot_curves(result: Any, path: str | os.PathLike | None = None):
    """Mean insertion and deletion curves: a panel per kind, a colour per sparsity, a line style
    per method."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sparsities = sorted(float(s) for s in result.curves)
    colours = plt.get_cmap("viridis")(torch.linspace(0.1, 0.9, max(len(sparsities), 1)).tolist())
    styles = ["-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for s, colour in zip(sparsities, colours):
            for m, method in enumerate(result.methods):
                ys = result.curves[f"{s:g}"][method][kind]
                xs = torch.linspace(0, 1, len(ys)).tolist()
                ax.plot(xs, ys, color=colour, linestyle=styles[m % len(styles)],
                        label=f"{sparsity_label(s)} {method}")
        ax.set_title(f"{kind} (reference: {result.config.reference})")
        ax.set_xlabel("fraction of pixels " + ("inserted" if kind == "insertion" else "deleted"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probability of the explained class")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    if path is not None:
        _save(result, fig, path)
    return fig


__all__ = ["plot_curves", "plot_figure4"]
