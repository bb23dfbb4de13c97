"""Conversion of timm's ``Eva`` (EVA-02, DINOv3, the RoPE ViTs) to a :class:`HookedViTConfig` and back.

A HookedViT holds an Eva in the layout of its ViT blocks, so every analysis reads the same modules:
q/k/v fused into ``attn.qkv`` (Eva's unfused ``q_proj``/``k_proj``/``v_proj`` or ``q_bias``/``v_bias``
with its constant zero k bias), LayerScale ``gamma_1``/``gamma_2`` as ``ls1.gamma``/``ls2.gamma``, a
packed SwiGLU ``fc1`` split into ``fc1_g`` (the gate, timm's first half) and ``fc1_x``. The rotary
table is timm's own module (``model.rope``), rebuilt from the config.
"""

from __future__ import annotations

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from hooked_vit.components import build_rope, rotary_table
from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.timm_parts import (
    TIMM_ACT_LAYER,
    act_fn_name,
    attn_pool_problems,
    is_exactly,
    is_layer_norm,
    mlp_ratio,
    norm_and_attention_problems,
    patch_embed_problems,
)

_ROPE_TYPES = {RotaryEmbeddingCat: "cat", RotaryEmbeddingDinoV3: "dinov3"}


def rope_settings(model: Eva) -> dict | None:
    """``cfg.rope`` of an Eva: the rotary embedding's keyword arguments as Eva passes them to timm's
    ``create_rope_embed`` (``None`` without RoPE)."""
    rope = model.rope
    if rope is None:
        return None
    settings = {"rope_type": _ROPE_TYPES[type(rope)], "temperature": float(rope.temperature),
                "grid_indexing": rope.grid_indexing, "grid_offset": float(rope.grid_offset),
                "rotate_half": bool(rope.rotate_half)}
    if settings["rope_type"] == "cat":
        settings["ref_feat_shape"] = None if rope.ref_feat_shape is None else list(rope.ref_feat_shape)
    return settings


def _rope_problems(model: Eva, grid_size: int) -> list[str]:
    rope = model.rope
    if rope is None:
        return []
    if getattr(model, "rope_mixed", False) or type(rope) not in _ROPE_TYPES:
        return [f"rotary embedding {type(rope).__name__} (supported: RotaryEmbeddingCat, RotaryEmbeddingDinoV3)"]
    if any(getattr(rope, name, None) is not None for name in ("shift_coords", "jitter_coords", "rescale_coords")):
        return ["train-time RoPE coordinate augmentation (shift/jitter/rescale_coords)"]
    theirs = rotary_table(rope, grid_size)
    if theirs.is_meta:  # built on the meta device (architecture only): no table to compare
        return []
    ours = rotary_table(build_rope(rope_settings(model), model.embed_dim, model.blocks[0].attn.num_heads, grid_size),
                        grid_size)
    if ours.shape != theirs.shape or not torch.equal(ours, theirs.to(ours)):
        return ["rotary embedding settings that timm's Eva constructor does not produce"]
    return []


def _mlp_kind(mlp: nn.Module) -> str | None:
    """``"mlp"``, ``"glu"`` (packed SwiGLU) or ``"swiglu"``; ``None`` for an unsupported MLP."""

    if is_exactly(mlp, Mlp) and isinstance(mlp.fc1, nn.Linear) and act_fn_name(mlp.act) is not None:
        return "mlp"
    if is_exactly(mlp, GluMlp) and isinstance(mlp.fc1, nn.Linear) and not mlp.gate_last and is_exactly(mlp.act, nn.SiLU):
        return "glu"
    if is_exactly(mlp, SwiGLU) and is_exactly(mlp.act, nn.SiLU):
        return "swiglu"
    return None


def _block_problems(block: nn.Module, model: Eva) -> list[str]:
    if not is_exactly(block, EvaBlock):
        return [f"block type {type(block).__name__} (expected timm EvaBlock; post-norm blocks are not supported)"]
    problems, attn, mlp = norm_and_attention_problems(block), block.attn, block.mlp
    if not is_exactly(attn, EvaAttention):
        problems.append(f"attention {type(attn).__name__} (expected EvaAttention; attn_type='rope' is not supported)")
    else:
        if attn.num_heads * attn.head_dim != model.embed_dim:
            problems.append(f"attention width {attn.num_heads} x {attn.head_dim} != embed_dim {model.embed_dim}")
        if not (is_exactly(attn.norm, nn.Identity) or is_layer_norm(attn.norm)):
            problems.append(f"attention inner norm {type(attn.norm).__name__}, expected LayerNorm")
        if attn.proj.bias is None:
            problems.append("attention projection without bias")
        if attn.qkv is None and (attn.k_proj.bias is not None or (attn.q_proj.bias is None) != (attn.v_proj.bias is None)):
            problems.append("unfused q/k/v with a k bias or with only one of the q and v biases")
    kind = _mlp_kind(mlp)
    if kind is None:
        problems.append(f"MLP {type(mlp).__name__} with {type(getattr(mlp, 'act', None)).__name__} (supported: Mlp "
                        "with GELU/QuickGELU/tanh GELU, SwiGLU and packed GluMlp with SiLU)")
    else:
        if not (is_exactly(mlp.norm, nn.Identity) or is_layer_norm(mlp.norm)):
            problems.append(f"MLP inner norm {type(mlp.norm).__name__}, expected LayerNorm")
        fc1s = [mlp.fc1_g, mlp.fc1_x] if kind == "swiglu" else [mlp.fc1]
        if any(fc.bias is None for fc in fc1s + [mlp.fc2]):
            problems.append("MLP without biases")
    if (block.gamma_1 is None) != (block.gamma_2 is None):
        problems.append("LayerScale on the attention branch only (attn_only_layer_scale)")
    return problems


def eva_problems(model: Eva) -> list[str]:
    """Every feature of an Eva that HookedViT cannot reproduce exactly (empty if supported)."""

    problems = []
    if type(model) is not Eva:
        problems.append(f"Eva subclass {type(model).__name__}")
    problems += patch_embed_problems(model.patch_embed, model.norm_pre, allow_dynamic=True)
    if model.patch_drop is not None:
        problems.append("patch dropout")
    if model.global_pool not in ("token", "avg", "map"):
        problems.append(f"global_pool={model.global_pool!r} (supported: 'token', 'avg', 'map')")
    if model.global_pool == "map" and model.attn_pool is not None:
        problems += attn_pool_problems(model.attn_pool, model)
    if not (is_exactly(model.norm_pre, nn.Identity) or is_layer_norm(model.norm_pre)):
        problems.append(f"norm_pre is {type(model.norm_pre).__name__}, expected LayerNorm or Identity")
    norm, fc_norm = model.norm, model.fc_norm
    if is_exactly(norm, nn.Identity) == is_exactly(fc_norm, nn.Identity):
        problems.append("no final norm" if is_exactly(norm, nn.Identity) else "both a final norm and fc_norm")
    elif not is_layer_norm(fc_norm if is_exactly(norm, nn.Identity) else norm):
        problems.append("final norm that is not LayerNorm")
    if not (is_exactly(model.head, nn.Identity) or (isinstance(model.head, nn.Linear) and model.head.bias is not None)):
        problems.append(f"classifier head {type(model.head).__name__} (expected nn.Linear with bias, or none)")
    if model.pos_embed is None and model.rope is None:
        problems.append("neither an absolute nor a rotary position embedding")
    if not len(model.blocks):
        return problems + ["no blocks"]
    grid = model.patch_embed.grid_size[0]
    problems += _rope_problems(model, grid)
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        problems.append(f"LayerNorms with different eps {sorted(eps)}")
    per_block, shapes = {}, set()
    for i, block in enumerate(model.blocks):
        for problem in _block_problems(block, model):
            per_block.setdefault(problem, []).append(i)
        if is_exactly(block, EvaBlock) and is_exactly(block.attn, EvaAttention) and _mlp_kind(block.mlp) is not None:
            shapes.add(_block_shape(block))
    for problem, layers in per_block.items():
        where = "every block" if len(layers) == len(model.blocks) else "blocks " + ",".join(map(str, layers))
        problems.append(f"{problem} ({where})")
    if len(shapes) > 1:
        problems.append("blocks of different widths, head counts, biases, norms or MLPs")
    return problems


def _block_shape(block: EvaBlock) -> tuple:
    attn, mlp = block.attn, block.mlp
    qkv_bias = attn.q_bias is not None if attn.qkv is not None else attn.q_proj.bias is not None
    return (attn.num_heads, qkv_bias, attn.qkv is not None, is_exactly(attn.norm, nn.Identity), _mlp_kind(mlp),
            mlp.fc2.in_features, is_exactly(mlp.norm, nn.Identity), type(mlp.act).__name__, block.gamma_1 is None)


def config_from_eva(model: Eva) -> dict:
    """The :class:`HookedViTConfig` fields of a supported Eva (``timm_kwargs`` rebuild it)."""

    patch, block = model.patch_embed, model.blocks[0]
    attn, mlp = block.attn, block.mlp
    kind = _mlp_kind(mlp)
    d_model, d_mlp = model.embed_dim, mlp.fc2.in_features
    qkv_bias = attn.q_bias is not None if attn.qkv is not None else attn.q_proj.bias is not None
    layer_scale, ln_pre = block.gamma_1 is not None, not is_exactly(model.norm_pre, nn.Identity)
    fc_norm, rope = is_exactly(model.norm, nn.Identity), rope_settings(model)
    img = patch.img_size[0]
    timm_kwargs = dict(
        img_size=img, patch_size=patch.patch_size[0], in_chans=patch.proj.in_channels, num_classes=model.num_classes,
        global_pool=model.global_pool, embed_dim=d_model, depth=len(model.blocks), num_heads=attn.num_heads,
        qkv_bias=qkv_bias, qkv_fused=attn.qkv is not None, mlp_ratio=mlp_ratio(d_model, d_mlp),
        swiglu_mlp=kind != "mlp", scale_mlp=not is_exactly(mlp.norm, nn.Identity),
        scale_attn_inner=not is_exactly(attn.norm, nn.Identity), init_values=1.0 if layer_scale else None,
        class_token=model.cls_token is not None, num_reg_tokens=model.num_prefix_tokens - int(model.cls_token is not None),
        no_embed_class=model.no_embed_class, use_abs_pos_emb=model.pos_embed is not None,
        use_rot_pos_emb=rope is not None, use_pre_transformer_norm=ln_pre, use_fc_norm=fc_norm,
        use_post_transformer_norm=not fc_norm, dynamic_img_size=model.dynamic_img_size,
    )
    if kind == "swiglu" and is_exactly(mlp.norm, nn.Identity):  # timm builds separate fc1_g/fc1_x only with a norm or alignment
        timm_kwargs["swiglu_align_to"] = 1
    if kind == "mlp" and act_fn_name(mlp.act) != "gelu":
        timm_kwargs["act_layer"] = TIMM_ACT_LAYER[act_fn_name(mlp.act)]
    if rope is not None:
        timm_kwargs.update(rope_type=rope["rope_type"], rope_temperature=rope["temperature"],
                           rope_grid_indexing=rope["grid_indexing"], rope_grid_offset=rope["grid_offset"],
                           rope_rotate_half=rope["rotate_half"])
        if rope.get("ref_feat_shape") is not None:
            timm_kwargs["ref_feat_shape"] = rope["ref_feat_shape"]
    return dict(
        img_size=img, patch_size=patch.patch_size[0], in_chans=patch.proj.in_channels, d_model=d_model,
        n_layers=len(model.blocks), n_heads=attn.num_heads, d_mlp=d_mlp, n_classes=model.num_classes,
        layer_scale=layer_scale, no_embed_class=model.no_embed_class, qkv_bias=qkv_bias, ln_eps=block.norm1.eps,
        n_registers=timm_kwargs["num_reg_tokens"], pooling=model.global_pool, fc_norm=fc_norm,
        class_token=model.cls_token is not None, ln_pre=ln_pre, patch_bias=not ln_pre,
        act_fn="silu" if kind != "mlp" else act_fn_name(mlp.act), abs_pos_embed=model.pos_embed is not None, rope=rope,
        gated_mlp=kind != "mlp", mlp_norm=not is_exactly(mlp.norm, nn.Identity), attn_norm=not is_exactly(attn.norm, nn.Identity),
        timm_class="Eva", timm_kwargs=timm_kwargs,
    )


def eva_to_hooked_state_dict(state_dict: dict[str, torch.Tensor], cfg: HookedViTConfig) -> dict[str, torch.Tensor]:
    """An Eva state dict (norms already renamed) in the HookedViT layout: fused ``qkv`` (zero k bias),
    ``ls1``/``ls2.gamma``, a packed SwiGLU ``fc1`` split into ``fc1_g``/``fc1_x``."""
    out = dict(state_dict)
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        for n in (1, 2):
            if f"{p}gamma_{n}" in out:
                out[f"{p}ls{n}.gamma"] = out.pop(f"{p}gamma_{n}")
        if f"{p}attn.q_proj.weight" in out:
            out[f"{p}attn.qkv.weight"] = torch.cat([out.pop(f"{p}attn.{w}_proj.weight") for w in "qkv"])
            if f"{p}attn.q_proj.bias" in out:
                out[f"{p}attn.q_bias"], out[f"{p}attn.v_bias"] = out.pop(f"{p}attn.q_proj.bias"), out.pop(f"{p}attn.v_proj.bias")
        if f"{p}attn.q_bias" in out:
            q_bias, v_bias = out.pop(f"{p}attn.q_bias"), out.pop(f"{p}attn.v_bias")
            out[f"{p}attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        if cfg.gated_mlp and f"{p}mlp.fc1.weight" in out:  # GluMlp: act(first half) * second half
            for kind in ("weight", "bias"):
                out[f"{p}mlp.fc1_g.{kind}"], out[f"{p}mlp.fc1_x.{kind}"] = out.pop(f"{p}mlp.fc1.{kind}").chunk(2, dim=0)
    return out


def hooked_to_eva_state_dict(state_dict: dict[str, torch.Tensor], cfg: HookedViTConfig,
                             target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`eva_to_hooked_state_dict` (norms renamed by the caller), into the layout of the
    Eva whose state-dict keys are ``target_keys``; refuses a k bias that is not zero (Eva has none)."""
    out = dict(state_dict)
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        for n in (1, 2):
            if f"{p}ls{n}.gamma" in out:
                out[f"{p}gamma_{n}"] = out.pop(f"{p}ls{n}.gamma")
        if f"{p}attn.qkv.bias" in out:
            q_bias, k_bias, v_bias = out.pop(f"{p}attn.qkv.bias").chunk(3)
            if torch.count_nonzero(k_bias):
                raise InvalidArgumentError(f"{p}attn's k bias is not zero; timm's Eva has none, so to_timm() cannot "
                                           "hold these weights (keep the k bias at zero when training)")
            if f"{p}attn.q_proj.bias" in target_keys:
                out[f"{p}attn.q_proj.bias"], out[f"{p}attn.v_proj.bias"] = q_bias, v_bias
            else:
                out[f"{p}attn.q_bias"], out[f"{p}attn.v_bias"] = q_bias, v_bias
        if f"{p}attn.q_proj.weight" in target_keys:
            for w, weight in zip("qkv", out.pop(f"{p}attn.qkv.weight").chunk(3)):
                out[f"{p}attn.{w}_proj.weight"] = weight
        if f"{p}mlp.fc1.weight" in target_keys and f"{p}mlp.fc1_g.weight" in out:
            for kind in ("weight", "bias"):
                out[f"{p}mlp.fc1.{kind}"] = torch.cat([out.pop(f"{p}mlp.fc1_g.{kind}"), out.pop(f"{p}mlp.fc1_x.{kind}")])
    return out
