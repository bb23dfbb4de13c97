"""TransformerLens's weight processing (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``, ``refactor_factored_attn_matrices``) on a HookedViT, plus LayerScale folding,
which DeiT-III needs and TL has no counterpart for.

The model's weights are written out in TransformerLens's state-dict layout, processed by TL's own
``ProcessWeights``, and written back into the timm-named parameters. Every result is still an
ordinary timm model (LayerNorm weight 1 and bias 0 after ``fold_ln``, LayerScale gamma 1 after
``fold_layer_scale``), so :meth:`~hooked_vit.HookedViT.to_timm` and ``save_pretrained`` work on it.

Layout of the embedding in TL's ``embed.W_E`` while processing: the patch-pixel rows of the
patch-embedding conv (``[in_chans * patch * patch, d_model]``), then its bias, then the CLS token;
each is a write to the residual stream, so centering each row centers every token embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformer_lens.weight_processing import ProcessWeights

from hooked_vit.components import LayerScale
from hooked_vit.errors import InvalidArgumentError


def fold_layer_scale_(model: nn.Module) -> None:
    """Fold each block's LayerScale into the weights before it (``attn.proj``, ``mlp.fc2``) and set
    ``gamma`` to 1. Exact up to fp32 rounding: ``(x W^T + b) * g = x (g W)^T + g b``."""
    with torch.no_grad():
        for block in model.blocks:
            for scale, linear in ((block.ls1, block.attn.proj), (block.ls2, block.mlp.fc2)):
                if isinstance(scale, LayerScale):
                    linear.weight.mul_(scale.gamma[:, None])
                    linear.bias.mul_(scale.gamma)
                    scale.gamma.fill_(1.0)


def to_tl_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights in TransformerLens's layout (LayerScale must already be folded or absent)."""
    sd = {}
    conv = model.patch_embed.proj
    sd["embed.W_E"] = torch.cat([model.W_E, conv.bias[None], model.cls_token[0]])
    sd["pos_embed.W_pos"] = model.pos_embed[0]
    for layer, block in enumerate(model.blocks):
        prefix = f"blocks.{layer}."
        sd[prefix + "ln1.w"], sd[prefix + "ln1.b"] = block.ln1.weight, block.ln1.bias
        sd[prefix + "ln2.w"], sd[prefix + "ln2.b"] = block.ln2.weight, block.ln2.bias
        for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O"):
            sd[prefix + "attn." + name] = getattr(block.attn, name)
        for name in ("W_in", "b_in", "W_out", "b_out"):
            sd[prefix + "mlp." + name] = getattr(block.mlp, name)
    sd["ln_final.w"], sd["ln_final.b"] = model.ln_final.weight, model.ln_final.bias
    sd["unembed.W_U"], sd["unembed.b_U"] = model.W_U, model.b_U
    return {k: v.detach().clone() for k, v in sd.items()}


def load_tl_state_dict_(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Write a TL-layout state dict (from :func:`to_tl_state_dict`, processed) back into ``model``;
    LayerNorm weights and biases absent from ``sd`` (folded away) become 1 and 0."""
    cfg = model.cfg
    n_pixels = cfg.in_chans * cfg.patch_size**2
    conv = model.patch_embed.proj
    with torch.no_grad():
        W_E = sd["embed.W_E"]
        conv.weight.copy_(W_E[:n_pixels].T.reshape(conv.weight.shape))
        conv.bias.copy_(W_E[n_pixels])
        model.cls_token.copy_(W_E[n_pixels + 1].view_as(model.cls_token))
        model.pos_embed.copy_(sd["pos_embed.W_pos"][None])
        for layer, block in enumerate(model.blocks):
            prefix = f"blocks.{layer}."
            for norm, name in ((block.ln1, "ln1"), (block.ln2, "ln2")):
                _load_norm(norm, sd, prefix + name)
            attn, mlp = block.attn, block.mlp
            W_qkv = torch.stack([sd[prefix + f"attn.W_{x}"] for x in "QKV"])  # [3, head, d_model, d_head]
            attn.qkv.weight.copy_(W_qkv.permute(0, 1, 3, 2).reshape(attn.qkv.weight.shape))
            b_qkv = torch.stack([sd[prefix + f"attn.b_{x}"] for x in "QKV"]).reshape(-1)
            if attn.qkv.bias is not None:
                attn.qkv.bias.copy_(b_qkv)
            attn.proj.weight.copy_(sd[prefix + "attn.W_O"].reshape(-1, cfg.d_model).T)
            attn.proj.bias.copy_(sd[prefix + "attn.b_O"])
            mlp.fc1.weight.copy_(sd[prefix + "mlp.W_in"].T)
            mlp.fc1.bias.copy_(sd[prefix + "mlp.b_in"])
            mlp.fc2.weight.copy_(sd[prefix + "mlp.W_out"].T)
            mlp.fc2.bias.copy_(sd[prefix + "mlp.b_out"])
        _load_norm(model.ln_final, sd, "ln_final")
        model.head.weight.copy_(sd["unembed.W_U"].T)
        model.head.bias.copy_(sd["unembed.b_U"])


def _load_norm(norm: nn.Module, sd: dict[str, Tensor], name: str) -> None:
    norm.weight.copy_(sd.get(name + ".w", torch.ones_like(norm.weight)))
    norm.bias.copy_(sd.get(name + ".b", torch.zeros_like(norm.bias)))


def check_processing_flags(
    *, fold_ln: bool, center_writing_weights: bool, center_unembed: bool, fold_value_biases: bool,
    fold_layer_scale: bool | None, pruned: bool, refactor_factored_attn_matrices: bool = False,
) -> bool:
    """Raise on flags that cannot be honoured, before any work; returns ``fold_layer_scale``
    resolved (``None`` -> whether any TransformerLens step is asked for)."""
    tl_processing = (fold_ln or center_writing_weights or center_unembed or fold_value_biases
                     or refactor_factored_attn_matrices)
    if tl_processing and fold_layer_scale is False:
        raise InvalidArgumentError("TransformerLens's weight processing works on the writing weights with LayerScale "
                                   "folded in: leave fold_layer_scale unset (or True)")
    if pruned and (fold_ln or center_writing_weights or refactor_factored_attn_matrices):
        raise InvalidArgumentError("fold_ln, center_writing_weights and refactor_factored_attn_matrices would fill in "
                                   "pruned (zero) weights; on a pruned model only fold_layer_scale, fold_value_biases "
                                   "and center_unembed are supported")
    return tl_processing if fold_layer_scale is None else fold_layer_scale


def process_weights_(
    model: nn.Module,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
    fold_layer_scale: bool | None = None,
) -> None:
    """Process ``model``'s weights in place, as TransformerLens's ``process_weights_`` does (same
    flags, same order: fold_ln, center_writing_weights, center_unembed, fold_value_biases,
    refactor_factored_attn_matrices), after folding LayerScale (``fold_layer_scale``; by default
    whenever a TL step runs, as TL's processing reads the writing weights with LayerScale folded in).

    Logits are unchanged (fp32 rounding; the refactoring's SVDs add ~1e-5) except with
    ``center_unembed``, which subtracts each image's mean logit (softmax and log-probabilities
    unchanged). ``fold_ln`` sets ``cfg.normalization_type`` to ``"LNPre"``. On a pruned model only
    steps that keep pruned weights at zero are allowed.
    """
    from hooked_vit.pruning.masks import is_pruned

    fold_layer_scale = check_processing_flags(
        fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases, fold_layer_scale=fold_layer_scale, pruned=is_pruned(model),
        refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    fold_ln = fold_ln and model.cfg.normalization_type == "LN"  # already folded: nothing to fold
    if not model.cfg.qkv_bias and (fold_ln or refactor_factored_attn_matrices):
        raise InvalidArgumentError("this model has no q/k/v bias (qkv_bias=False), so fold_ln and "
                                   "refactor_factored_attn_matrices cannot write one; leave them False")
    tl_steps = (fold_ln or center_writing_weights or center_unembed or fold_value_biases
                or refactor_factored_attn_matrices)
    if tl_steps:
        cfg = model.cfg
        if (cfg.has_dist_token or cfg.n_registers or cfg.fc_norm or cfg.pooling != "token" or not cfg.n_classes
                or cfg.ln_pre or not cfg.patch_bias or cfg.timm_class != "VisionTransformer"):
            raise InvalidArgumentError("TransformerLens weight processing is implemented for CLS-token models with one "
                                       "classifier head (DeiT-III, ViT); not yet for distillation/register tokens, "
                                       "average or attention pooling, fc_norm, ln_pre (CLIP), headless models or "
                                       "timm Eva (EVA-02/DINOv3: RoPE, SwiGLU, inner norms) "
                                       "(fold_layer_scale alone works)")
    if fold_layer_scale:
        fold_layer_scale_(model)
    if not tl_steps:
        return
    sd = ProcessWeights.process_weights(
        to_tl_state_dict(model), model.cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
        center_unembed=center_unembed, fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )
    load_tl_state_dict_(model, sd)
    if fold_ln:
        model.cfg.normalization_type = "LNPre"


def processed_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    *,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    refactor_factored_attn_matrices: bool = False,
) -> dict[str, Tensor]:
    """``state_dict`` (laid out as ``model.state_dict()``) after the given steps, as
    :func:`process_weights_` would leave a model holding it (LayerScale folded first); ``model``
    and ``state_dict`` are left as they are. ``model.load_state_dict(result)`` then gives the model
    that ``from_pretrained`` with the same flags gives. Same refusals (pruned models, no q/k/v bias)."""
    import copy

    from hooked_vit.loading import check_state_dict
    from hooked_vit.pruning.masks import MASK_SUFFIX, prepare_for_state_dict

    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise InvalidArgumentError(f"state_dict must be a dict of tensors as model.state_dict() gives, got "
                                   f"{type(state_dict).__name__}")
    with torch.device("meta"):  # parameters are assigned from state_dict below
        work = type(model)(copy.deepcopy(model.cfg))
    prepare_for_state_dict(work, state_dict)  # a pruned model's weight_mask buffers
    check_state_dict(state_dict, work, "state_dict")
    check_processing_flags(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                           center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                           fold_layer_scale=None, pruned=any(k.endswith(MASK_SUFFIX) for k in state_dict),
                           refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    work.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, assign=True)
    process_weights_(work, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                     center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                     refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    return work.state_dict()
