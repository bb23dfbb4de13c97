"""Edges of a circuit: weights of the block matrices whose two end nodes are both active.

An edge is one weight of ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` or ``mlp.fc2`` that is present
(``weight_mask`` True, or every weight of an unpruned layer) and whose row node and column node
are both in the circuit:

==========  ===========================================  ======================
matrix      row (output) node                            column (input) node
==========  ===========================================  ======================
qkv         q/k/v head owning the row (3 x n_heads)      norm1 channel
proj        attn_out channel                             v head owning the column
fc1         mlp_act neuron                               norm2 channel
fc2         mlp_out channel                              mlp_act neuron
==========  ===========================================  ======================

A gated MLP (SwiGLU, EVA-02) has ``fc1_g`` and ``fc1_x`` for ``fc1``, both with fc1's nodes (the gated
product is the mlp_act neuron). An inner LayerNorm before ``proj`` or ``fc2`` (EVA-02) mixes its
inputs only through the per-token scale: the edges are still the weights between the nodes.

Counted for many circuits at once as ``sum_ij row[c, i] W[i, j] col[c, j]`` (two matmuls per
matrix, no loop over weights). The size fraction divides by the weight count of the four matrices
in the dense model (84,934,656 for DeiT-III B/16).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_vit.pruning.masks import MASK_NAME

MATRICES: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def block_matrices(block: nn.Module) -> tuple[str, ...]:
    """The block's matrices (names relative to it): :data:`MATRICES`, ``fc1`` as ``fc1_g`` and ``fc1_x`` when gated."""
    if not block.mlp.gated:
        return MATRICES
    return ("attn.qkv", "attn.proj", "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2")


def present_weights(linear: nn.Linear) -> Bool[Tensor, "out_features in_features"]:
    """The weights that exist: ``weight_mask`` of a pruned layer, else all."""
    mask = getattr(linear, MASK_NAME, None)
    return mask.bool() if mask is not None else torch.ones_like(linear.weight, dtype=torch.bool)


def dense_edge_count(model: nn.Module) -> int:
    """Weight count of every block's qkv, proj, fc1 and fc2 (the size denominator)."""
    return sum(block.get_submodule(name).weight.numel() for block in model.blocks for name in block_matrices(block))


def _bilinear_count(rows: Tensor, weights: Tensor, cols: Tensor) -> Tensor:
    """``sum_ij rows[c, i] * weights[i, j] * cols[c, j]`` per mask ``c`` (float64, exact for counts)."""
    return ((rows @ weights) * cols).sum(dim=-1)


@torch.no_grad()
def edge_counts(
    model: nn.Module, nodes: Bool[Tensor, "n_masks n_units"]
) -> Int[Tensor, "n_masks"]:
    """Edges of each circuit ``nodes[c]`` (active flags over all units, registry order)."""
    device = next(model.parameters()).device
    nodes = nodes.to(device=device, dtype=torch.float64)
    widths = [site.width for site in model.sites]
    per_site = dict(zip(((s.layer, s.name) for s in model.sites), nodes.split(widths, dim=-1)))
    d_head = model.cfg.d_head
    total = torch.zeros(nodes.shape[0], dtype=torch.float64, device=device)
    for layer, block in enumerate(model.blocks):
        node = {name: per_site[(layer, name)] for name in ("norm1", "q", "k", "v", "attn_out", "norm2",
                                                           "mlp_act", "mlp_out")}
        heads = lambda gate: gate.repeat_interleave(d_head, dim=-1)  # noqa: E731  [C, head] -> [C, d_model]
        qkv_rows = torch.cat([heads(node["q"]), heads(node["k"]), heads(node["v"])], dim=-1)
        fc1s = (block.mlp.fc1_g, block.mlp.fc1_x) if block.mlp.gated else (block.mlp.fc1,)
        pairs = [(block.attn.qkv, qkv_rows, node["norm1"]),
                 (block.attn.proj, node["attn_out"], heads(node["v"])),
                 *((fc1, node["mlp_act"], node["norm2"]) for fc1 in fc1s),
                 (block.mlp.fc2, node["mlp_out"], node["mlp_act"])]
        for linear, rows, cols in pairs:
            total += _bilinear_count(rows, present_weights(linear).to(torch.float64), cols)
    return total.round().long().cpu()


def edge_fractions(model: nn.Module, nodes: Bool[Tensor, "n_masks n_units"]) -> Float[Tensor, "n_masks"]:
    """Edges of each circuit / weight count of the dense model's four block matrices."""
    return edge_counts(model, nodes).double() / dense_edge_count(model)
