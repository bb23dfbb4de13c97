"""Which Linear layers of a HookedViT are pruned, and the hook whose value is each one's input.

Pruned: every Linear inside the transformer blocks (``attn.qkv``, ``attn.proj``, ``mlp.fc1`` (``fc1_g`` and
``fc1_x`` in a gated MLP), ``mlp.fc2``); never the patch embedding or the classifier head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hooked_vit.errors import InvalidTypeError

def input_hooks(block: nn.Module) -> dict[str, str]:
    """Each pruned Linear of a block (name relative to it) -> the hook (relative to the block) whose value
    that Linear multiplies. ``attn.hook_z`` is ``[batch, pos, head, d_head]``; heads flattened head-major
    give proj's d_model input. A gated MLP has ``fc1_g`` and ``fc1_x`` for ``fc1``; an inner norm
    (EVA-02) is the input of the Linear after it."""
    attn_norm, mlp_norm = hasattr(block.attn, "norm"), hasattr(block.mlp, "norm")
    hooks = {"attn.qkv": "ln1.hook_normalized",
             "attn.proj": "attn.norm.hook_normalized" if attn_norm else "attn.hook_z"}
    for fc in ("mlp.fc1_g", "mlp.fc1_x") if block.mlp.gated else ("mlp.fc1",):
        hooks[fc] = "ln2.hook_normalized"
    hooks["mlp.fc2"] = "mlp.norm.hook_normalized" if mlp_norm else "mlp.hook_post"
    return hooks


@dataclass(frozen=True)
class PrunableLayer:
    """One pruned Linear: its module name, the module, and the hook feeding it."""

    name: str
    module: nn.Linear
    input_hook: str

    @property
    def in_features(self) -> int:
        return self.module.in_features


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """The pruned Linears of ``model`` (a HookedViT), in block order then qkv, proj, fc1, fc2."""
    if not hasattr(model, "blocks"):
        raise InvalidTypeError(f"pruning needs a HookedViT (with .blocks), got {type(model).__name__}")
    layers = []
    for i, block in enumerate(model.blocks):
        for rel_name, hook in input_hooks(block).items():
            module = block.get_submodule(rel_name)
            if not isinstance(module, nn.Linear):
                raise InvalidTypeError(f"blocks.{i}.{rel_name} is {type(module).__name__}, expected nn.Linear")
            layers.append(PrunableLayer(f"blocks.{i}.{rel_name}", module, f"blocks.{i}.{hook}"))
    return layers
