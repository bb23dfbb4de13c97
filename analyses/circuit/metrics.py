"""Circuit metrics (sec. 3.4, 4.4, C.3): balanced class-vs-rest accuracy of the circuit, of the full
model and of the complement, node and edge fractions, and NCQ in its two forms.

* ``acc``: balanced binary accuracy (mean of true-positive and true-negative rates) of predicting
  class ``c`` iff the argmax over all classes is ``c``;
* ``ncq_eq12 = (acc / acc_full) * (1 - node_frac)`` as eq. 12 writes it;
* ``ncq = acc * (1 - edge_frac)``, the form that reproduces Table 3 (dense: 0.8912 * (1 - 0.3242)
  = 0.602).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from analyses.circuit.replacement import gated_logits


def balanced_accuracy(
    predicted: Bool[Tensor, "n"], is_target: Bool[Tensor, "n"], owner: Int[Tensor, "n"], n_masks: int
) -> Float[Tensor, "n_masks"]:
    """Per mask row: mean of the true-positive rate (over its images with ``is_target``) and the
    true-negative rate (over the others); ``predicted`` says "this image is the row's class"."""
    def rate(hit: Tensor, members: Tensor) -> Tensor:
        hits = torch.zeros(n_masks, dtype=torch.float64).index_add_(0, owner[members], hit[members].double())
        counts = torch.bincount(owner[members], minlength=n_masks).double()
        return hits / counts

    owner, predicted, is_target = owner.cpu(), predicted.cpu(), is_target.cpu()
    return 0.5 * (rate(predicted, is_target) + rate(~predicted, ~is_target))


@dataclass
class EvalSet:
    """Images of several class-vs-rest tasks laid out in one batch: image ``i`` belongs to mask row
    ``owner[i]`` (whose class is ``classes[owner[i]]``) and is a positive iff ``is_target[i]``."""

    images: Tensor
    is_target: Tensor
    owner: Tensor
    classes: list[int]


@torch.no_grad()
def accuracies(
    model: nn.Module,
    data: EvalSet,
    nodes: Bool[Tensor, "n_masks n_units"] | None,
    references: Mapping[str, Tensor],
    *,
    complement: bool = False,
    freeze_ln: bool = False,
    batch_size: int = 256,
) -> Float[Tensor, "n_masks"]:
    """Balanced accuracy of each mask row's circuit (``nodes``; ``None``: the full model;
    ``complement``: the circuit's nodes replaced, the rest kept) on its class-vs-rest images."""
    param = next(model.parameters())
    widths = [site.width for site in model.sites]
    gates = None
    if nodes is not None:
        keep = ~nodes if complement else nodes
        gates = dict(zip(model.sites.hook_names, keep.to(device=param.device, dtype=param.dtype).split(widths, -1)))
    classes = torch.tensor(data.classes, dtype=torch.long)
    predicted = []
    for start in range(0, data.images.shape[0], batch_size):
        images = data.images[start:start + batch_size].to(device=param.device, dtype=param.dtype)
        owner = data.owner[start:start + batch_size].to(param.device)
        logits = model(images) if gates is None else gated_logits(model, images, gates, references, owner,
                                                                  freeze_ln=freeze_ln)
        predicted.append(logits.argmax(dim=-1).cpu() == classes[owner.cpu()])
    return balanced_accuracy(torch.cat(predicted), data.is_target, data.owner, len(data.classes))


def ncq_edges(acc: float, edge_frac: float) -> float:
    """``acc * (1 - edge_frac)``: the NCQ form that reproduces the paper's Table 3."""
    return acc * (1.0 - edge_frac)


def ncq_eq12(acc: float, acc_full: float, node_frac: float) -> float:
    """``(acc / acc_full) * (1 - node_frac)``: NCQ as eq. 12 writes it (0 when ``acc_full`` is 0)."""
    return (acc / acc_full) * (1.0 - node_frac) if acc_full > 0 else 0.0


def site_fractions(sites: Sequence, nodes: Bool[Tensor, "n_units"]) -> dict[str, float]:
    """Fraction of active nodes per site hook."""
    parts = nodes.split([site.width for site in sites])
    return {site.hook_name: float(part.double().mean()) for site, part in zip(sites, parts)}
