"""Attribution graphs of the replacement model: feature nodes ``(layer, latent)`` and one error node
per layer, their scores on the attributed logit, and the edges between adjacent layers (with the
error row and column), averaged over the attributed images; pruning, JSON save/load and a figure."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vit import atomic
from hooked_vit.errors import CorruptFileError, check
from hooked_vit.reading import read_json

ERROR = "error"


@dataclass
class AttributionGraph:
    """``hooks`` (the replaced layers), ``nodes[l]`` the feature scores ``[d_sae_l]``, ``error[l]``
    the error node's score, ``edges[l]`` ``[d_sae_l + 1, d_sae_{l+1} + 1]`` from layer ``l`` to
    ``l + 1`` (last row: the error node upstream; last column: what layer ``l + 1``'s features do not
    carry, the node score minus its edges, as the reference's error column), ``kept[l]`` the feature
    nodes kept by :meth:`prune` (``None``: all). The last layer's nodes feed the logit with their
    score. Scores and edges are means over ``n_images`` images attributed to ``target``."""

    hooks: list[str]
    target: int
    objective: str
    n_images: int
    nodes: list[Tensor]
    error: Tensor
    edges: list[Tensor]
    kept: list[Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def kept_nodes(self, layer: int) -> Int[Tensor, "n"]:
        """The feature nodes of ``layer`` in the graph (all if unpruned), by decreasing score."""
        if self.kept is not None:
            return self.kept[layer]
        return torch.argsort(self.nodes[layer], descending=True)

    def prune(self, node_budget: int) -> AttributionGraph:
        """The graph with the ``node_budget`` feature nodes of highest score over all layers (the
        reference ranks nodes by score, descending); error nodes always stay."""
        check(isinstance(node_budget, int) and node_budget >= 1, f"node_budget must be a whole number >= 1, "
                                                                 f"got {node_budget!r}")
        flat = torch.cat(self.nodes)
        layer_of = torch.cat([torch.full((len(n),), i) for i, n in enumerate(self.nodes)])
        offsets = torch.tensor([0] + [len(n) for n in self.nodes]).cumsum(0)
        top = torch.argsort(flat, descending=True)[:node_budget]
        kept = []
        for layer in range(len(self.nodes)):
            chosen = top[layer_of[top] == layer] - offsets[layer]
            kept.append(chosen[torch.argsort(self.nodes[layer][chosen], descending=True)])
        return replace(self, kept=kept)

    def edge(self, layer: int, source: int | str, dest: int | str) -> float:
        """The edge weight from ``source`` (a latent or ``"error"``) of ``layer`` to ``dest`` of ``layer + 1``
        (``"logit"`` from the last layer: the node's score)."""
        if dest == "logit":
            check(layer == len(self.nodes) - 1, "only the last replaced layer has edges to the logit")
            return float(self.error[layer] if source == ERROR else self.nodes[layer][source])
        i = -1 if source == ERROR else int(source)
        o = -1 if dest == ERROR else int(dest)
        return float(self.edges[layer][i, o])

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """The kept nodes and the edges among them (JSON-able)."""
        nodes, edges = [], []
        for layer in range(len(self.nodes)):
            nodes += [{"layer": layer, "latent": int(i), "score": float(self.nodes[layer][i])}
                      for i in self.kept_nodes(layer)]
            nodes.append({"layer": layer, "latent": ERROR, "score": float(self.error[layer])})
        for layer, matrix in enumerate(self.edges):
            sources = [*map(int, self.kept_nodes(layer)), -1]
            dests = [*map(int, self.kept_nodes(layer + 1)), -1]
            sub = matrix[sources][:, dests]
            for a, i in enumerate(sources):
                for b, o in enumerate(dests):
                    if sub[a, b] != 0:
                        edges.append({"layer": layer, "source": ERROR if i < 0 else i, "dest": ERROR if o < 0 else o,
                                      "weight": float(sub[a, b])})
        return {"hooks": self.hooks, "target": self.target, "objective": self.objective, "n_images": self.n_images,
                "d_sae": [len(n) for n in self.nodes], "pruned": self.kept is not None, "nodes": nodes,
                "edges": edges, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        return atomic.write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttributionGraph:
        """A graph saved by :meth:`save` (nodes and edges outside it are zero)."""
        data = read_json(path, "an attribution graph (JSON)", "delete it and recompute the graph")
        try:
            sizes = [int(n) for n in data["d_sae"]]
            nodes = [torch.zeros(n) for n in sizes]
            error = torch.zeros(len(sizes))
            kept: list[list[int]] = [[] for _ in sizes]
            for node in data["nodes"]:
                if node["latent"] == ERROR:
                    error[node["layer"]] = node["score"]
                else:
                    nodes[node["layer"]][node["latent"]] = node["score"]
                    kept[node["layer"]].append(int(node["latent"]))
            edges = [torch.zeros(sizes[i] + 1, sizes[i + 1] + 1) for i in range(len(sizes) - 1)]
            for e in data["edges"]:
                i = -1 if e["source"] == ERROR else int(e["source"])
                o = -1 if e["dest"] == ERROR else int(e["dest"])
                edges[e["layer"]][i, o] = e["weight"]
            return cls(list(data["hooks"]), int(data["target"]), str(data["objective"]), int(data["n_images"]),
                       nodes, error, edges, [torch.tensor(k, dtype=torch.long) for k in kept] if data["pruned"] else None,
                       dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CorruptFileError(path, "an attribution graph saved by AttributionGraph.save",
                                   "delete it and recompute the graph", found=f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ figure
    def plot(self, path: str | os.PathLike | None = None, *, thumbnails: dict[tuple[int, int], Tensor] | None = None,
             title: str | None = None):
        """A layered drawing: one column per replaced layer then the logit, feature nodes (circles,
        area ~ score) by decreasing score with the error node (square) at the bottom, edges coloured by
        sign (red +, blue -) with width ~ |weight|. ``thumbnails[(layer, latent)]`` (``[H, W]`` or
        ``[H, W, 3]`` in [0, 1]): an image patch drawn beside the node. Saved to ``path`` if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        layers = len(self.nodes)
        kept = [self.kept_nodes(l)[:40] for l in range(layers)]
        rows = max([len(k) for k in kept] + [1]) + 1
        fig, ax = plt.subplots(figsize=(2.6 * (layers + 1), max(3.0, 0.42 * rows + 1.2)))
        pos: dict[tuple[int, Any], tuple[float, float]] = {}
        for l in range(layers):
            for r, i in enumerate(kept[l]):
                pos[(l, int(i))] = (l, rows - 1 - r)
            pos[(l, ERROR)] = (l, -0.2)
        pos[(layers, "logit")] = (layers, (rows - 1) / 2)
        biggest = max([float(self.nodes[l][kept[l]].abs().max()) for l in range(layers) if len(kept[l])] + [1e-12])
        weights = []
        for l, matrix in enumerate(self.edges):
            for i in [*map(int, kept[l]), -1]:
                for o in [*map(int, kept[l + 1]), -1]:
                    w = float(matrix[i, o])
                    if w != 0:
                        weights.append((w, (l, ERROR if i < 0 else i), (l + 1, ERROR if o < 0 else o)))
        for l in range(layers):
            weights += [(float(self.nodes[l][i]), (l, int(i)), (layers, "logit")) for i in kept[l]] if l == layers - 1 else []
        weights.append((float(self.error[-1]), (layers - 1, ERROR), (layers, "logit")))
        wmax = max([abs(w) for w, _, _ in weights] + [1e-12])
        for w, a, b in weights:
            (x0, y0), (x1, y1) = pos[a], pos[b]
            ax.plot([x0, x1], [y0, y1], color="tab:red" if w > 0 else "tab:blue", lw=0.3 + 3 * abs(w) / wmax,
                    alpha=0.15 + 0.6 * abs(w) / wmax, zorder=1)
        for (l, i), (x, y) in pos.items():
            if i == "logit":
                ax.scatter([x], [y], s=300, marker="D", color="black", zorder=2)
                ax.annotate(f"logit {self.target}", (x, y), xytext=(8, 0), textcoords="offset points", va="center")
                continue
            score = float(self.error[l] if i == ERROR else self.nodes[l][i])
            ax.scatter([x], [y], s=40 + 400 * abs(score) / biggest, marker="s" if i == ERROR else "o",
                       color="grey" if i == ERROR else ("tab:orange" if score > 0 else "tab:cyan"),
                       edgecolor="black", zorder=2)
            ax.annotate(f"{'err' if i == ERROR else i} ({score:.2g})", (x, y), xytext=(7, 4),
                        textcoords="offset points", fontsize=7)
            if thumbnails is not None and (l, i) in thumbnails:
                image = thumbnails[(l, i)].detach().cpu().float().clamp(0, 1).numpy()
                box = AnnotationBbox(OffsetImage(image, zoom=0.9, cmap="gray"), (x, y), xybox=(-22, 0),
                                     xycoords="data", boxcoords="offset points", frameon=False)
                ax.add_artist(box)
        ax.set_xticks(range(layers + 1), [h.removesuffix(".hook_resid_post") for h in self.hooks] + ["logit"])
        ax.set_yticks([])
        ax.set_xlim(-0.6, layers + 0.8)
        ax.set_title(title or f"Attribution graph of class {self.target} ({self.objective}, {self.n_images} images)")
        fig.tight_layout()
        if path is not None:
            atomic.save_figure(fig, path, dpi=110)
            plt.close(fig)
        return fig


__all__ = ["ERROR", "AttributionGraph"]
