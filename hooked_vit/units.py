"""The units at one hook of a HookedViT, and their activation per image.

A unit is one scalar per image: a neuron (``mlp.hook_pre``/``hook_post``), a head (the L2 norm of
its ``[d_head]`` slice of ``attn.hook_q/k/v/z``: its output norm at ``hook_z``), a residual-stream
dimension (``hook_resid_*``, ``hook_attn_out``, ``hook_mlp_out``, the LayerNorm outputs,
``hook_pooled``), an SAE latent (an sae-lens SAE read at its hook) or another dictionary's latent
(any object with an sae-lens SAE's ``encode``, ``W_enc``, ``cfg.d_sae`` and ``cfg.metadata``, and
its kind in ``unit_kind``, e.g. ``clt_latent`` for a cross-layer transcoder's encoder). A unit's value at one token is
reduced to one number per image by ``position``: ``"patch_max"`` (the maximum over the patch tokens,
the spatial max of a convolutional channel), ``"patch_mean"`` or ``"cls"`` (the CLS token; the only
choice for a hook without a token axis such as ``hook_pooled``).

:func:`site_units` (``HookedViT.units``) names them; :meth:`SiteUnits.activations` computes every
unit of the site for a batch of images in one forward pass that stops after the hook's block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vit.errors import InvalidArgumentError, check

POSITIONS: tuple[str, ...] = ("patch_max", "patch_mean", "cls")
KINDS: tuple[str, ...] = ("neuron", "head", "residual", "sae_latent", "clt_latent")


@dataclass(frozen=True)
class SiteUnits:
    """Units ``indices`` of kind ``kind`` at hook ``hook_name`` (block ``layer``; ``None`` before or
    after the blocks), each reduced over tokens by ``position``; ``sae`` holds the SAE whose latents
    they are (kind ``sae_latent`` or the dictionary's ``unit_kind``)."""

    hook_name: str
    kind: str
    layer: int | None
    indices: tuple[int, ...]
    position: str
    width: int
    sae: Any = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def label(self) -> str:
        """A short readable name, e.g. ``blocks.3.mlp.hook_post:neuron``."""
        return f"{self.hook_name}:{self.kind}"

    def describe(self) -> dict[str, Any]:
        """JSON-able description (no tensors)."""
        return {"hook_name": self.hook_name, "kind": self.kind, "layer": self.layer, "position": self.position,
                "width": self.width, "n_units": len(self), "indices": list(self.indices)}

    def reduce(self, act: Float[Tensor, "batch *dims"], n_prefix: int = 1) -> Float[Tensor, "batch n_units"]:
        """One value per image and unit from the hook's value ``act``."""
        if act.ndim == 4:  # [batch pos head d_head]: a head's norm at each token
            act = torch.linalg.vector_norm(act, dim=-1)
        if act.ndim == 3:  # [batch pos width]
            if self.sae is not None:
                act = self.sae.encode(act.to(self.sae.W_enc.dtype))
            if self.position == "cls":
                act = act[:, 0]
            elif self.position == "patch_max":
                act = act[:, n_prefix:].amax(dim=1)
            else:
                act = act[:, n_prefix:].mean(dim=1)
        elif self.sae is not None:
            act = self.sae.encode(act.to(self.sae.W_enc.dtype))
        return act[:, list(self.indices)].float()

    @torch.no_grad()
    def activations(self, model: nn.Module, images: Float[Tensor, "n channel height width"], *,
                    batch_size: int = 256) -> Float[Tensor, "n n_units"]:
        """Every unit's activation on every image, in one pass over ``images`` (batches of
        ``batch_size``; the forward stops after the hook's block)."""
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        stop = None if self.layer is None else self.layer + 1
        device = next(model.parameters()).device
        parts = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device)
            _, cache = model.run_with_cache(batch, names_filter=[self.hook_name], stop_at_layer=stop,
                                            return_cache_object=False)
            parts.append(self.reduce(cache[self.hook_name], model.cfg.n_prefix_tokens).cpu())
        return torch.cat(parts)


def _kind(hook_name: str, shape: tuple[int, ...]) -> str:
    if len(shape) == 4:
        return "head"
    if hook_name.endswith(("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "mlp.norm.hook_normalized")):
        return "neuron"
    return "residual"


def _dictionary_input(sae: Any) -> tuple[str, str]:
    """The hook a dictionary reads and the tokens it was trained on: an sae-lens SAE's through
    :mod:`hooked_vit.saes`, another dictionary's from its ``cfg.metadata``."""
    if getattr(sae, "unit_kind", "sae_latent") == "sae_latent":
        from hooked_vit.saes import sae_hook_name, sae_tokens

        return sae_hook_name(sae), sae_tokens(sae)
    return str(sae.cfg.metadata.hook_name), str(sae.cfg.metadata.tokens)


def site_units(model: nn.Module, site: Any, *, indices: Sequence[int] | None = None, position: str = "patch_max",
               sae: Any = None) -> SiteUnits:
    """The units at ``site``: a hook name (``"blocks.3.mlp.hook_post"``), a circuit
    :class:`~hooked_vit.sites.Site` or its key ``(layer, name)`` (``(3, "mlp_act")``). ``indices``
    picks some (default all); ``position`` reduces tokens (:data:`POSITIONS`). With ``sae`` (an
    sae-lens SAE reading ``site``'s hook, or a dictionary shaped like one with its ``unit_kind``), the
    units are its latents; ``tokens='cls'`` SAEs are read at the CLS token whatever ``position``, as
    trained."""
    from hooked_vit.hook_table import hook_shape
    from hooked_vit.sites import Site
    from hooked_vit.tokens import hook_layout

    if isinstance(site, tuple):
        site = model.sites[site]
    hook_name = site.hook_name if isinstance(site, Site) else site
    layout = hook_layout(model, hook_name)  # unknown hooks fail here, with the closest names
    check(position in POSITIONS, f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    check(position != "cls" or not layout.has_positions or model.cfg.class_token,
          f"{model.cfg.model_name} has no class token (e.g. SigLIP): choose position='patch_max' or 'patch_mean', "
          "or the pooled features (site 'hook_pooled')")
    if not layout.has_positions:
        check(position == "cls", f"{hook_name} has no token axis (it is the CLS/pooled position): use position='cls'")
    shape = hook_shape(hook_name, model.cfg, 1)
    kind, width = _kind(hook_name, shape), (shape[2] if len(shape) == 4 else shape[-1])
    if sae is not None:
        reads, tokens = _dictionary_input(sae)
        check(reads == hook_name, f"the SAE reads {reads}, not {hook_name}: pass its own hook")
        check(len(shape) == 3 or not layout.has_positions, f"SAE latents need a [batch pos d] or [batch d] hook, "
              f"{hook_name} is {list(shape)}")
        kind, width = getattr(sae, "unit_kind", "sae_latent"), int(sae.cfg.d_sae)
        check(kind in KINDS, f"a dictionary's unit_kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if tokens == "cls":
            position = "cls"
    chosen = tuple(range(width)) if indices is None else tuple(int(i) for i in indices)
    if not chosen or min(chosen) < 0 or max(chosen) >= width:
        raise InvalidArgumentError(f"indices must be a non-empty list in [0, {width}) for {hook_name} "
                                   f"({kind}s), got {list(indices or [])[:5]}")
    layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else None
    return SiteUnits(hook_name, kind, layer, chosen, position, width, sae)


__all__ = ["KINDS", "POSITIONS", "SiteUnits", "site_units"]
