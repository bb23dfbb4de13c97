"""The feature catalogue of a replacement model (the paper's feature analysis across depth): for every
live latent of every layer, the images and patches where it fires most, its class selectivity
(entropy over classes of its activation mass) and its spatial spread (entropy over patch positions),
and a figure of how these change with depth (low-level, local features early; class-selective ones
late)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_vit import atomic


def feature_catalogue(model: nn.Module, rm: Any, images: Float[Tensor, "n channel height width"],
                      labels: Int[Tensor, "n"], *, top: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per live latent (active on some patch of ``images``): ``layer``, ``latent``,
    ``class_entropy`` and ``position_entropy`` (bits, of its summed patch activation over classes and
    over patch positions; low = selective / local), ``frequency`` (fraction of patch tokens where it
    fires), ``top_class`` and its ``top`` (image index, patch index) pairs by activation."""
    n_classes = model.cfg.n_classes
    prefix = model.cfg.n_prefix_tokens
    device = next(model.parameters()).device
    by_class = {h: 0 for h in rm.hooks}
    by_position = {h: 0 for h in rm.hooks}
    fired = {h: 0 for h in rm.hooks}
    best = {h: (torch.full((0, s.cfg.d_sae), -1.0), torch.zeros((0, s.cfg.d_sae), dtype=torch.long))
            for h, s in rm.saes.items()}
    n_tokens = 0
    for start in range(0, len(images), batch_size):
        _, layers = rm._clean(model, images[start:start + batch_size].to(device))
        onehot = torch.nn.functional.one_hot(labels[start:start + batch_size], n_classes).float().to(device)
        for hook, layer in zip(rm.hooks, layers):
            z = layer["z"][:, prefix:]  # [batch patches f]
            by_class[hook] = by_class[hook] + torch.einsum("bpf,bc->cf", z, onehot).cpu()
            by_position[hook] = by_position[hook] + z.sum(0).cpu()
            fired[hook] = fired[hook] + (z > 0).sum((0, 1)).cpu()
            peak, where = z.max(1)  # per image: [batch f]
            values = torch.cat([best[hook][0], peak.cpu()])
            flat = torch.cat([best[hook][1], (torch.arange(start, start + len(z))[:, None] * z.shape[1]
                                              + where.cpu())])
            keep = values.topk(min(top, len(values)), dim=0).indices
            best[hook] = (values.gather(0, keep), flat.gather(0, keep))
        n_tokens += z.shape[0] * z.shape[1]

    def entropy(mass: Tensor) -> Tensor:  # [groups f] -> bits per latent
        p = mass / mass.sum(0, keepdim=True).clamp_min(1e-12)
        return (-(p * p.clamp_min(1e-12).log2()).sum(0)).clamp_min(0.0)

    rows = []
    for layer, hook in enumerate(rm.hooks):
        live = torch.nonzero(fired[hook] > 0)[:, 0]
        class_h, position_h = entropy(by_class[hook]), entropy(by_position[hook])
        values, flat = best[hook]
        n_patches = by_position[hook].shape[0]
        for latent in live.tolist():
            pairs = [(int(f) // n_patches, int(f) % n_patches) for v, f in zip(values[:, latent], flat[:, latent])
                     if v > 0]
            rows.append({"layer": layer, "hook": hook, "latent": latent, "class_entropy": float(class_h[latent]),
                         "position_entropy": float(position_h[latent]),
                         "frequency": float(fired[hook][latent]) / n_tokens,
                         "top_class": int(by_class[hook][:, latent].argmax()), "top": pairs})
    return rows


def plot_catalogue(rows: list[dict[str, Any]], n_classes: int, n_patches: int,
                   path: str | os.PathLike | None = None, *, title: str = ""):
    """Class selectivity and spatial spread of the live latents against depth (violins per layer;
    dashed: the uniform entropy). Saved to ``path`` if given; returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, bound, label in ((axes[0], "class_entropy", math.log2(n_classes), "class entropy (bits)"),
                                  (axes[1], "position_entropy", math.log2(n_patches), "spatial entropy (bits)")):
        values = [[r[key] for r in rows if r["layer"] == l] for l in layers]
        drawn = [(l, v) for l, v in zip(layers, values) if len(v) >= 2]
        if drawn:
            ax.violinplot([v for _, v in drawn], positions=[l for l, _ in drawn], showmedians=True)
        ax.axhline(bound, ls="--", color="grey", lw=0.8)
        ax.set_xticks(layers, [f"blocks.{l}" for l in layers])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Live latents across depth: class selectivity and spatial spread")
    fig.tight_layout()
    if path is not None:
        atomic.save_figure(fig, path, dpi=110)
        plt.close(fig)
    return fig


__all__ = ["feature_catalogue", "plot_catalogue"]
