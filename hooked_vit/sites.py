"""The 96 circuit sites of the IMPACT paper: 8 per block (norm1, q, k, v, attn_out, norm2, mlp_act,
mlp_out), each mapped to the hook whose value it is.

A *unit* is what an analysis ablates or masks: a feature (one channel of a ``[batch pos width]``
activation) or, at q/k/v, a head (one ``[d_head]`` slice of a ``[batch pos head d_head]`` activation).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import UnknownNameError
from hooked_vit.names import SITE_NAMES  # noqa: F401  (public here)


_SITE_HOOKS: dict[str, str] = {
    "norm1": "ln1.hook_normalized",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "attn_out": "hook_attn_out",
    "norm2": "ln2.hook_normalized",
    "mlp_act": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
}


@dataclass(frozen=True)
class Site:
    """One circuit site: ``width`` units of kind ``unit`` at hook ``hook_name``."""

    layer: int
    name: str
    hook_name: str
    unit: Literal["feature", "head"]
    width: int

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape of a per-unit tensor that broadcasts against this site's activation."""
        return (self.width, 1) if self.unit == "head" else (self.width,)

    def unit_activation(
        self, act: Float[Tensor, "batch pos *unit_dims"]
    ) -> Float[Tensor, "batch pos width"]:
        """One scalar per unit: the feature itself, or a head's L2 norm over ``d_head``."""
        return torch.linalg.vector_norm(act, dim=-1) if self.unit == "head" else act


class SiteRegistry:
    """All circuit sites of a model, in block order then ``SITE_NAMES`` order.

    >>> model.sites[3, "mlp_act"].hook_name
    'blocks.3.mlp.hook_post'
    """

    def __init__(self, cfg: HookedViTConfig):
        widths = {
            "norm1": cfg.d_model, "q": cfg.n_heads, "k": cfg.n_heads, "v": cfg.n_heads,
            "attn_out": cfg.d_model, "norm2": cfg.d_model, "mlp_act": cfg.d_mlp, "mlp_out": cfg.d_model,
        }
        self._sites = [
            Site(layer, name, f"blocks.{layer}.{_SITE_HOOKS[name]}",
                 "head" if name in ("q", "k", "v") else "feature", widths[name])
            for layer in range(cfg.n_layers)
            for name in SITE_NAMES
        ]
        self._by_key = {(s.layer, s.name): s for s in self._sites}
        self._by_hook = {s.hook_name: s for s in self._sites}
        self.n_layers = cfg.n_layers

    def __iter__(self) -> Iterator[Site]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __getitem__(self, key: tuple[int, str]) -> Site:
        layer, name = key
        if name not in SITE_NAMES:
            raise UnknownNameError(f"Unknown site {name!r}; sites are {list(SITE_NAMES)}")
        if layer < 0:
            layer += self.n_layers
        if not 0 <= layer < self.n_layers:
            raise UnknownNameError(f"Layer {key[0]} out of range for a model with {self.n_layers} blocks")
        return self._by_key[(layer, name)]

    def __contains__(self, hook_name: object) -> bool:
        return hook_name in self._by_hook

    def from_hook_name(self, hook_name: str) -> Site:
        """The site whose value is hook ``hook_name``."""
        try:
            return self._by_hook[hook_name]
        except KeyError:
            raise UnknownNameError(f"{hook_name!r} is not a circuit site hook") from None

    def at_layer(self, layer: int) -> list[Site]:
        return [self[layer, name] for name in SITE_NAMES]

    @property
    def hook_names(self) -> list[str]:
        return [s.hook_name for s in self._sites]

    @property
    def n_units(self) -> int:
        """Total units over all sites (the node count of a full circuit)."""
        return sum(s.width for s in self._sites)

    def __repr__(self) -> str:
        return f"SiteRegistry({len(self)} sites over {self.n_layers} blocks, {self.n_units} units)"
