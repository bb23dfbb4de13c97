"""Figures of the circuit level: the four Table 3 metrics per model, and the fraction of active
nodes per (block, site) per model. Each takes a :class:`~analyses.circuit.result.CircuitResult`
(not imported here: the result imports this module when it saves)."""

from __future__ import annotations

import os
from typing import Any

from hooked_vit import atomic
from hooked_vit.sites import SITE_NAMES

PANELS = (("node_frac", "Node (%)", 100.0), ("edge_frac", "Size (%)", 100.0), ("acc", "Acc. (%)", 100.0),
          ("ncq", "NCQ", 1.0))


def _pyplot(path):
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, plt, path, result) -> None:
    fig.tight_layout()
    _save(fig, plt, path, result)


def _save(fig, plt, path, result) -> None:
    if path is not None:
        atomic.save_figure(fig, path, dpi=120, metadata={"Description": result.config_comment()})
        plt.close(fig)


def plot_metrics(result: Any, path: str | os.PathLike | None = None):
    """Node %, Size %, Acc % and NCQ per model at its Table 3 k: per-class points, mean ± std bars,
    and in the Acc panel the full model's and the complement's mean accuracy."""
    plt = _pyplot(path)
    table = result.table3()
    labels = [r["model"] for r in table]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.3 * len(PANELS), 3.4), squeeze=False)
    for ax, (metric, title, scale) in zip(axes[0], PANELS):
        for x, row in enumerate(table):
            values = [scale * r[metric] for r in result.select(row["model"], row["k"])]
            ax.scatter([x] * len(values), values, s=10, alpha=0.5, color="tab:blue")
            ax.errorbar([x], [scale * row[f"{metric}_mean"]], yerr=[scale * row[f"{metric}_std"]], fmt="o",
                        color="black", capsize=4)
            if metric == "acc":
                ax.scatter([x], [scale * row["acc_full_mean"]], marker="_", s=200, color="tab:green",
                           label="full model" if x == 0 else None)
                ax.scatter([x], [scale * row["acc_ablated_mean"]], marker="x", color="tab:red",
                           label="complement" if x == 0 else None)
        if metric == "acc":
            ax.axhline(50, color="grey", lw=0.8, ls=":")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    config = result.config
    fig.suptitle(f"Circuit level: {config.model}, {config.method}, {config.steps} steps, loss {config.loss}, "
                 f"{config.reference} replacement", fontsize=9)
    _finish(fig, plt, path, result)
    return fig


def plot_heatmap(result: Any, path: str | os.PathLike | None = None):
    """Per model (its Table 3 k), the fraction of active nodes per (block, site), averaged over classes."""
    plt = _pyplot(path)
    table = result.table3()
    fig, axes = plt.subplots(1, len(table), figsize=(2.4 * len(table) + 1.2, 3.6), squeeze=False, sharey=True,
                             constrained_layout=True)
    image = None
    for i, (ax, row) in enumerate(zip(axes[0], table)):
        rows = result.select(row["model"], row["k"])
        hooks = list(rows[0]["site_fractions"])
        n_layers = len(hooks) // len(SITE_NAMES)
        grid = [[sum(r["site_fractions"][hooks[layer * len(SITE_NAMES) + j]] for r in rows) / len(rows)
                 for j in range(len(SITE_NAMES))] for layer in range(n_layers)]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(SITE_NAMES)), SITE_NAMES, rotation=70, fontsize=7)
        ax.set_yticks(range(n_layers), [f"block {b}" for b in range(n_layers)], fontsize=7)
        ax.tick_params(axis="y", labelleft=i == 0)
        ax.set_title(f"{row['model']} (k={row['k']:g})", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="active node fraction")
    fig.suptitle(f"Active nodes per (block, site), mean over classes: {result.config.model}", fontsize=9)
    _save(fig, plt, path, result)
    return fig
