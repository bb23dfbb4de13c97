"""Learnable node masks: one logit per node of the 96 circuit sites, for ``C`` classes at once.

The gate of a node is the Heaviside step ``1[m > 0]`` of its logit ``m`` in the forward pass; the
backward pass uses the sigmoid surrogate of eq. 13, ``tau * s(tau m) * (1 - s(tau m))``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from hooked_vit.sites import Site, SiteRegistry
from hooked_vit.errors import InvalidArgumentError


class _HeavisideSigmoid(torch.autograd.Function):
    """``1[m > 0]`` forward, ``tau * s(tau m) (1 - s(tau m))`` backward (eqs. 13 and 15)."""

    @staticmethod
    def forward(ctx, logits: Tensor, tau: float) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.tau = tau
        return (logits > 0).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (logits,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.tau * logits)
        return grad * ctx.tau * s * (1 - s), None


def heaviside_gate(logits: Float[Tensor, "*shape"], tau: float = 1.0) -> Float[Tensor, "*shape"]:
    """Exact 0/1 gates of ``logits``, differentiable through the sigmoid surrogate of temperature ``tau``."""
    return _HeavisideSigmoid.apply(logits, tau)


class NodeMasks(nn.Module):
    """Mask logits ``[n_masks, n_units]`` over every unit of ``sites`` (in registry order: block,
    then norm1, q, k, v, attn_out, norm2, mlp_act, mlp_out), one row per class being trained.

    :meth:`split` cuts a ``[n_masks, n_units]`` tensor into per-site ``[n_masks, width]`` views.
    """

    def __init__(self, sites: SiteRegistry, n_masks: int = 1, *, init_mean: float = 0.5, init_std: float = 0.01,
                 generator: torch.Generator | None = None, device: str | torch.device | None = None):
        super().__init__()
        self.sites: list[Site] = list(sites)
        self.widths = [site.width for site in self.sites]
        logits = torch.randn(n_masks, sum(self.widths), generator=generator) * init_std + init_mean
        self.logits = nn.Parameter(logits.to(device))

    @property
    def n_units(self) -> int:
        return self.logits.shape[1]

    def gates(self, tau: float = 1.0) -> Float[Tensor, "n_masks n_units"]:
        """Hard 0/1 gates with the surrogate gradient."""
        return heaviside_gate(self.logits, tau)

    def active(self) -> Bool[Tensor, "n_masks n_units"]:
        """Which nodes are kept (logit > 0)."""
        return self.logits.detach() > 0

    @torch.no_grad()
    def clamp_(self, bound: float = 1.0) -> None:
        """Clamp the logits to ``[-bound, bound]`` (after every optimiser step)."""
        self.logits.clamp_(-bound, bound)

    def split(self, values: Tensor) -> dict[str, Tensor]:
        """``{site hook name: values[:, site's slice]}`` for a ``[n_masks, n_units]`` tensor."""
        return dict(zip((s.hook_name for s in self.sites), values.split(self.widths, dim=-1)))


def nodes_to_vector(sites: SiteRegistry, nodes: dict[str, Tensor]) -> Bool[Tensor, "n_units"]:
    """Per-site node masks ``{hook name: bool [width]}`` concatenated in registry order; every site
    must be present with its width."""
    parts = []
    for site in sites:
        if site.hook_name not in nodes:
            raise InvalidArgumentError(f"node mask has no entry for site {site.hook_name!r} ({len(nodes)} "
                                       f"entries; a circuit has one per site of the model: {len(sites)})")
        part = nodes[site.hook_name].reshape(-1)
        if part.numel() != site.width:
            raise InvalidArgumentError(f"node mask of {site.hook_name!r} has {part.numel()} entries but the "
                                       f"model's site has {site.width} units: the mask was made for another "
                                       "architecture")
        parts.append(part.bool().cpu())
    extra = sorted(set(nodes) - set(sites.hook_names))
    if extra:
        raise InvalidArgumentError(f"node mask has entries {extra[:3]} that are not sites of this model "
                                   "(it was made for another architecture)")
    return torch.cat(parts)
