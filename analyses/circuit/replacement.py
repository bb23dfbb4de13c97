"""Running a model with gated nodes: every node whose gate is 0 is replaced by its reference (eq. 11)

    a_tilde = g * a + (1 - g) * a_ref   (one fused ``torch.lerp(a_ref, a, g)``)

through forward hooks on the 96 site hooks. Gates are ``[n_masks, width]`` per site; with ``owner``
(``[batch]``, the mask row of each image) every image sees only its own mask, so circuits of many
classes run in one batch. A gate of exactly 1 leaves the activation bit-identical, 0 gives exactly
the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.common.ablation import ActivationMeans, site_reference
from hooked_vit.sites import Site
from hooked_vit.errors import InvalidArgumentError

HookFn = Callable[..., Tensor]


def ln_scale_hooks(model: nn.Module) -> list[str]:
    """The LayerNorm scale hooks of the model (``ln1``/``ln2`` of every block, then the final norm:
    ``ln_final`` or ``fc_norm``, and the attention-pool head's norm where there is one)."""
    return [name for name in model.hook_dict if name.endswith(".hook_scale")]


def site_references(model: nn.Module, reference: str, means: ActivationMeans | None) -> dict[str, Tensor]:
    """Per site hook, the replacement value: per-position mean ``[pos *unit_dims]`` (``"mean"``),
    mean over positions too ``[*unit_dims]`` (``"pooled_mean"``) or a scalar 0 (``"zero"``), on the
    model's device and dtype."""
    param = next(model.parameters())
    kind = "zero" if reference == "zero" else "mean"
    if kind == "mean" and means is None:
        raise InvalidArgumentError(f"reference={reference!r} needs dataset means "
                                   "(analyses.common.ablation.load_or_compute_means)")
    return {site.hook_name: site_reference(site, kind, means, pooled=reference == "pooled_mean").to(
        device=param.device, dtype=param.dtype) for site in model.sites}


Owner = Int[Tensor, "batch"] | int | None


def _gate_hook(site: Site, gate: Tensor, reference: Tensor, owner: Tensor | int | None) -> HookFn:
    unit_dims = (site.width, 1) if site.unit == "head" else (site.width,)
    if isinstance(owner, int):  # row c owns images [c * owner, (c + 1) * owner): a view, no gather
        g = gate.reshape(gate.shape[0], 1, 1, *unit_dims)  # [n_masks, 1, 1, *unit_dims]

        def hook(act: Tensor, hook=None) -> Tensor:
            blocks = act.view(gate.shape[0], owner, *act.shape[1:])  # [n_masks, owner, pos, *unit_dims]
            return torch.lerp(reference, blocks, g.to(act.dtype)).view(act.shape)

        return hook
    per_image = gate[owner] if owner is not None else gate  # [batch or 1, width]
    g = per_image.reshape(per_image.shape[0], 1, *unit_dims)

    def hook(act: Tensor, hook=None) -> Tensor:
        return torch.lerp(reference, act, g.to(act.dtype))

    return hook


def gate_hooks(
    model: nn.Module,
    gates: Mapping[str, Float[Tensor, "n_masks _width"]],
    references: Mapping[str, Tensor],
    owner: Owner = None,
) -> list[tuple[str, HookFn]]:
    """Forward hooks applying ``gates`` (site hook name -> ``[n_masks, width]``, 1 keeps a node, 0
    replaces it by ``references[hook]``) to a batch whose image ``i`` uses mask row ``owner[i]``.
    ``owner`` may also be an int ``n`` (row ``c`` owns the ``n`` consecutive images from ``c * n``:
    the layout of training batches, applied as a view) or ``None`` (a single row for every image)."""
    out = []
    for site in model.sites:
        gate = gates[site.hook_name]
        if owner is None and gate.shape[0] != 1:
            raise InvalidArgumentError(f"{gate.shape[0]} mask rows need owner= (the mask row of each image)")
        out.append((site.hook_name, _gate_hook(site, gate, references[site.hook_name], owner)))
    return out


def gated_logits(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    gates: Mapping[str, Float[Tensor, "n_masks _width"]],
    references: Mapping[str, Tensor],
    owner: Owner = None,
    *,
    freeze_ln: bool = False,
) -> Float[Tensor, "batch n_classes"]:
    """Logits of ``model`` with gated nodes (see :func:`gate_hooks`); with ``freeze_ln`` every
    LayerNorm divides by its scale from a clean (ungated) pass over the same images."""
    hooks = gate_hooks(model, gates, references, owner)
    if freeze_ln:
        scales: dict[str, Tensor] = {}

        def keep(scale: Tensor, hook) -> None:
            scales[hook.name] = scale.detach()

        names = ln_scale_hooks(model)
        with torch.no_grad():
            model.run_with_hooks(images, fwd_hooks=[(name, keep) for name in names])
        hooks += [(name, lambda scale, hook: scales[hook.name]) for name in names]
    return model.run_with_hooks(images, fwd_hooks=hooks)
