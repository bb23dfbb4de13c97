"""Conversion between timm ``VisionTransformer`` instances and :class:`HookedViTConfig` + state
dict, and loading of weights (shipped file, local checkpoint, timm's hub)."""

from __future__ import annotations

import os
import re
import socket
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp
from timm.layers.attention import Attention as TimmAttention
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.eva import config_from_eva, eva_problems, eva_to_hooked_state_dict, hooked_to_eva_state_dict
from hooked_vit.errors import (
    CheckpointMismatchError,
    CorruptFileError,
    MissingFileError,
    OfflineWeightsError,
    UnsupportedModelError,
    short_exception,
)
from hooked_vit.pretrained import PretrainedSpec
from hooked_vit.timm_parts import (
    TIMM_ACT_LAYER,
    act_fn_name,
    attn_pool_problems,
    foreign_parts,
    is_exactly,
    is_layer_norm,
    mlp_ratio,
    norm_and_attention_problems,
    patch_embed_problems,
)




# Hooked names differ from timm's only in the norms (TransformerLens names them ln1/ln2/ln_final/ln_pre).
_TO_HOOKED = [(re.compile(r"(^|\.)norm1\."), r"\1ln1."), (re.compile(r"(^|\.)norm2\."), r"\1ln2."),
              (re.compile(r"^norm\."), "ln_final."), (re.compile(r"^norm_pre\."), "ln_pre.")]
_TO_TIMM = [(re.compile(r"(^|\.)ln1\."), r"\1norm1."), (re.compile(r"(^|\.)ln2\."), r"\1norm2."),
            (re.compile(r"^ln_final\."), "norm."), (re.compile(r"^ln_pre\."), "norm_pre.")]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def timm_to_hooked_state_dict(state_dict: dict[str, torch.Tensor], cfg: HookedViTConfig | None = None
                              ) -> dict[str, torch.Tensor]:
    """Rename timm keys (``blocks.0.norm1.weight``) to hooked keys (``blocks.0.ln1.weight``); for an
    Eva (``cfg.timm_class``) also fuse q/k/v and rename LayerScale (:func:`hooked_vit.eva.eva_to_hooked_state_dict`)."""
    renamed = {_rename(k, _TO_HOOKED): v for k, v in state_dict.items()}
    return eva_to_hooked_state_dict(renamed, cfg) if cfg is not None and cfg.timm_class == "Eva" else renamed


def hooked_to_timm_state_dict(state_dict: dict[str, torch.Tensor], cfg: HookedViTConfig | None = None,
                              target_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`timm_to_hooked_state_dict` (for an Eva, into the layout of the timm model whose
    state-dict keys are ``target_keys``)."""
    renamed = {_rename(k, _TO_TIMM): v for k, v in state_dict.items()}
    if cfg is not None and cfg.timm_class == "Eva":
        return hooked_to_eva_state_dict(renamed, cfg, target_keys or set())
    return renamed


# Parts of an Eva that foreign_parts names but HookedViT reproduces (rotary embeddings, SwiGLU)
_EVA_PARTS = ("rotary position embeddings", "SwiGLU MLP", "gated (GLU) MLP")


def unsupported_features(model: nn.Module) -> list[str]:
    """Every feature of ``model`` that HookedViT cannot reproduce exactly (empty if supported).

    Supported: timm ``VisionTransformer`` (and DeiT's ``VisionTransformerDistilled``) with or
    without a class token, optional distillation token or registers, learned absolute position
    embedding, optional ``norm_pre`` (CLIP, with its bias-free patch embedding), pre-norm ``Block``s
    (plain ``Attention``, ``Mlp`` with exact GELU, QuickGELU or tanh GELU, optional LayerScale),
    LayerNorms, and token, average or attention-pool (``AttentionPoolLatent``) pooling with the
    final norm before (``norm``) or after pooling (``fc_norm``); and timm's ``Eva`` (EVA-02, DINOv3:
    :func:`hooked_vit.eva.eva_problems`)."""
    if isinstance(model, Eva):
        return eva_problems(model) + [p for p in foreign_parts(model) if p not in _EVA_PARTS]
    if not isinstance(model, VisionTransformer):
        return ["not a timm VisionTransformer"] + foreign_parts(model)
    problems = []
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        problems.append(f"VisionTransformer subclass {type(model).__name__}")
    foreign = foreign_parts(model)
    problems += foreign
    distilled = isinstance(model, VisionTransformerDistilled)
    if model.pos_embed is None:
        problems.append("no learned absolute position embedding")
    if model.dynamic_img_size:
        problems.append("dynamic_img_size=True")
    problems += patch_embed_problems(model.patch_embed, getattr(model, "norm_pre", nn.Identity()))
    if model.global_pool not in ("token", "avg", "map"):
        problems.append(f"global_pool={model.global_pool!r} (supported: 'token', 'avg', 'map')")
    if model.global_pool in ("avg", "map") and model.pool_include_prefix:
        problems.append("pool_include_prefix=True")
    if model.global_pool == "map" and getattr(model, "attn_pool", None) is not None:
        problems += attn_pool_problems(model.attn_pool, model)
    norm_pre = getattr(model, "norm_pre", nn.Identity())
    if not (is_exactly(norm_pre, nn.Identity) or is_layer_norm(norm_pre)):
        problems.append(f"norm_pre is {type(norm_pre).__name__}, expected LayerNorm or Identity")
    if not is_exactly(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        problems.append(f"patch_drop is {type(model.patch_drop).__name__}, expected Identity")
    norm, fc_norm = model.norm, getattr(model, "fc_norm", nn.Identity())
    if is_exactly(norm, nn.Identity) and is_exactly(fc_norm, nn.Identity):
        problems.append("no final norm (final_norm=False)")
    elif not is_exactly(norm, nn.Identity) and not is_exactly(fc_norm, nn.Identity):
        problems.append("both a final norm and fc_norm")
    elif not is_layer_norm(fc_norm if is_exactly(norm, nn.Identity) else norm):
        problems.append(f"final norm is {type(fc_norm if is_exactly(norm, nn.Identity) else norm).__name__}, expected LayerNorm")
    heads = [model.head] + ([model.head_dist] if distilled else [])
    for head in heads:
        if not (is_exactly(head, nn.Identity) or (isinstance(head, nn.Linear) and head.bias is not None)):
            problems.append(f"classifier head {type(head).__name__} (expected nn.Linear with bias, or none)")
    if distilled:
        if model.no_embed_class:
            problems.append("distillation token with no_embed_class=True")
        if not is_exactly(fc_norm, nn.Identity):
            problems.append("distillation token with fc_norm (timm's distilled head skips it)")
        if model.num_reg_tokens:
            problems.append("distillation token with register tokens")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        problems.append(f"LayerNorms with different eps {sorted(eps)}")
    shapes, per_block = set(), {}  # per_block: problem -> the blocks that have it
    for i, block in enumerate(model.blocks):
        found = []
        if not is_exactly(block, Block):
            found.append(f"block type {type(block).__name__} (expected timm Block)")
        else:
            found += _block_problems(block, model.embed_dim, foreign)
            if is_exactly(block.mlp, Mlp) and isinstance(block.mlp.fc1, nn.Linear) and is_exactly(block.attn, TimmAttention):
                shapes.add((block.mlp.fc1.out_features, block.attn.num_heads, block.attn.qkv.bias is not None,
                            act_fn_name(block.mlp.act)))
        for problem in found:
            per_block.setdefault(problem, []).append(i)
    for problem, layers in per_block.items():
        where = "every block" if len(layers) == len(model.blocks) else "blocks " + ",".join(map(str, layers))
        problems.append(f"{problem} ({where})")
    layer_scales = {type(getattr(b, ls)).__name__ for b in model.blocks if is_exactly(b, Block) for ls in ("ls1", "ls2")}
    if len(layer_scales) > 1:
        problems.append("LayerScale on some blocks only")
    if len(shapes) > 1:
        problems.append("blocks of different widths, head counts, q/k/v biases or activations")
    return problems


def _block_problems(block: nn.Module, embed_dim: int, foreign: list[str]) -> list[str]:
    """Unsupported features of one timm ``Block`` (without the block index)."""
    problems = norm_and_attention_problems(block)
    attn, mlp = block.attn, block.mlp
    if not is_exactly(attn, TimmAttention):
        problems.append(f"attention {type(attn).__name__} (expected timm Attention)")
    else:
        if not is_exactly(attn.norm, nn.Identity):
            problems.append("scale_attn_norm")
        if attn.num_heads * attn.head_dim != embed_dim or attn.qkv.out_features != 3 * embed_dim:
            problems.append(f"attention width {attn.num_heads} x {attn.head_dim} != embed_dim {embed_dim}")
        if attn.proj.bias is None:
            problems.append("attention projection without bias (proj_bias=False)")
    if not is_exactly(mlp, Mlp):
        if not any("MLP" in part for part in foreign):
            problems.append(f"MLP {type(mlp).__name__} (expected timm Mlp)")
    elif not is_exactly(mlp.norm, nn.Identity):
        problems.append("a norm inside the MLP (scale_mlp_norm)")
    elif not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)) or mlp.fc1.bias is None:
        problems.append("MLP without bias or not linear (proj_bias=False / use_conv)")
    elif act_fn_name(mlp.act) is None:
        problems.append(f"MLP activation {mlp.act} (supported: exact GELU, QuickGELU, tanh GELU)")
    for name in ("ls1", "ls2"):
        if type(getattr(block, name)).__name__ not in ("LayerScale", "Identity"):
            problems.append(f"{name} is {type(getattr(block, name)).__name__}")
    return problems


def config_from_timm(model: nn.Module, **overrides) -> HookedViTConfig:
    """The :class:`HookedViTConfig` of a supported timm model; raises
    :class:`UnsupportedModelError` (one line naming every unsupported feature) otherwise."""
    problems = unsupported_features(model)
    if problems:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise UnsupportedModelError(
            f"HookedViT cannot load {name} (timm {type(model).__name__}): unsupported: {'; '.join(problems)}. "
            "Supported: timm ViT/AugReg, DeiT (distilled too), DeiT-III, DINOv2 (registers), CLIP, SigLIP, "
            "EVA-02 and DINOv3 (timm Eva); token, avg or map pooling"
        )
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if isinstance(model, Eva):
        cfg = config_from_eva(model)
        cfg.update(model_name=pretrained_cfg.get("architecture", "custom"),
                   preprocessing=_preprocessing(pretrained_cfg, model.patch_embed))
        cfg.update(overrides)
        return HookedViTConfig(**cfg)
    patch = model.patch_embed
    img_h, _ = patch.img_size
    block = model.blocks[0]
    layer_scale = type(block.ls1).__name__ == "LayerScale"
    distilled = isinstance(model, VisionTransformerDistilled)
    fc_norm = is_exactly(model.norm, nn.Identity)
    ln_pre = not is_exactly(model.norm_pre, nn.Identity)
    act_fn = act_fn_name(block.mlp.act)
    d_model, d_mlp = model.embed_dim, block.mlp.fc1.out_features
    timm_kwargs = dict(
        img_size=img_h, patch_size=patch.patch_size[0], in_chans=patch.proj.in_channels,
        num_classes=model.num_classes, embed_dim=d_model, depth=len(model.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=mlp_ratio(d_model, d_mlp),
        qkv_bias=block.attn.qkv.bias is not None, init_values=1.0 if layer_scale else None,
        no_embed_class=model.no_embed_class, class_token=model.has_class_token, global_pool=model.global_pool,
    )
    if model.num_reg_tokens:
        timm_kwargs["reg_tokens"] = model.num_reg_tokens
    if fc_norm != (model.global_pool == "avg"):  # timm's default: fc_norm exactly with avg pooling
        timm_kwargs["fc_norm"] = fc_norm
    if ln_pre:  # norm_pre and a bias-free patch embedding
        timm_kwargs["pre_norm"] = True
    if TIMM_ACT_LAYER[act_fn] is not None:
        timm_kwargs["act_layer"] = TIMM_ACT_LAYER[act_fn]
    preprocessing = _preprocessing(pretrained_cfg, patch)
    cfg = dict(
        img_size=img_h, patch_size=patch.patch_size[0], in_chans=patch.proj.in_channels,
        d_model=d_model, n_layers=len(model.blocks), n_heads=block.attn.num_heads, d_mlp=d_mlp,
        n_classes=model.num_classes, layer_scale=layer_scale, no_embed_class=model.no_embed_class,
        qkv_bias=block.attn.qkv.bias is not None, ln_eps=block.norm1.eps,
        has_dist_token=distilled, n_registers=model.num_reg_tokens, pooling=model.global_pool,
        fc_norm=fc_norm, class_token=model.has_class_token, ln_pre=ln_pre, patch_bias=not ln_pre,
        act_fn=act_fn, model_name=pretrained_cfg.get("architecture", "custom"), timm_kwargs=timm_kwargs,
        preprocessing=preprocessing,
    )
    cfg.update(overrides)
    return HookedViTConfig(**cfg)


def _preprocessing(pretrained_cfg: dict, patch: nn.Module) -> dict:
    """The eval transform's settings of a timm ``pretrained_cfg``, at the model's own input size."""
    preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained_cfg.items()
                     if k in ("mean", "std", "crop_pct", "crop_mode", "interpolation")}
    img = patch.img_size[0]
    preprocessing["input_size"] = [patch.proj.in_channels, img, img]  # the model's, not the tag's
    return preprocessing


def build_timm_model(cfg: HookedViTConfig) -> VisionTransformer | Eva:
    """A fresh timm ``VisionTransformer`` (``VisionTransformerDistilled`` with a distillation token)
    of ``cfg``'s architecture (weights not loaded)."""
    kwargs = dict(cfg.timm_kwargs)
    if cfg.ln_eps != 1e-6:  # timm ViT's default eps; the config (JSON) holds the number, not a class
        kwargs["norm_layer"] = partial(TimmLayerNorm, eps=cfg.ln_eps)
    if cfg.timm_class == "Eva":
        model_class = Eva
    else:
        model_class = VisionTransformerDistilled if cfg.has_dist_token else VisionTransformer
    model = model_class(**kwargs)
    if cfg.preprocessing:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **cfg.preprocessing,
                                "architecture": cfg.timm_name or cfg.model_name}
    return model


def create_timm_from_spec(spec: PretrainedSpec, **kwargs) -> VisionTransformer | Eva:
    """Build the spec's timm architecture with random weights (seeded by the caller)."""
    if spec.timm_name is not None:
        return timm.create_model(spec.timm_name, pretrained=False, **{**spec.timm_kwargs, **kwargs})
    model = VisionTransformer(**{**spec.timm_kwargs, **kwargs})
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **spec.preprocessing, "architecture": spec.alias}
    return model


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a timm-format or original DeiT-III checkpoint (``.pth``/``.bin``/``.safetensors``,
    optionally nested under ``model``/``state_dict``) as a state dict with timm's key names.

    Nothing is resampled: a checkpoint for another image size fails :func:`check_state_dict`.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"Checkpoint {str(path)!r} does not exist (checkpoint_path must be a .pth/.bin/.safetensors file)"
        )
    expected = "a model checkpoint (.pth/.bin with a state dict, or .safetensors)"
    fix = "check the path, or download the checkpoint again (a partial download is truncated)"
    if path.stat().st_size == 0:
        raise CorruptFileError(path, expected, fix, found="an empty file")
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as error:  # the unpicklers raise anything (IndexError, KeyError 101, ...) on a foreign file
        raise CorruptFileError(path, expected, fix, found=f"unreadable: {short_exception(error)}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CorruptFileError(path, expected, fix, found="no dict of tensors inside")
    # Original DeiT-III checkpoints name LayerScale blocks.N.gamma_1 / gamma_2.
    return {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in state_dict.items()}


def check_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("mis-shaped keys", misshaped)) if keys]
        raise CheckpointMismatchError(
            f"Checkpoint {source} does not fit {getattr(model, 'default_cfg', {}).get('architecture', 'the model')}: "
            + "; ".join(parts) + ". Check that the checkpoint matches the model alias."
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(spec: PretrainedSpec) -> str | None:
    """Path of the spec's weights in the local Hugging Face cache, if present."""
    from huggingface_hub import try_to_load_from_cache

    # timm's own hub repo (QuickGELU variants share the GELU model's weights)
    pretrained_cfg = timm.models.get_pretrained_cfg(spec.hub_name)
    repo = getattr(pretrained_cfg, "hf_hub_id", None) or f"timm/{spec.hub_name}"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def load_checkpoint_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load checkpoint ``path`` into timm ``model`` strictly (see :func:`check_state_dict`)."""
    state_dict = read_checkpoint(path)
    check_state_dict(state_dict, model, str(path))
    model.load_state_dict(state_dict)
    return model


def load_pretrained_timm(spec: PretrainedSpec) -> VisionTransformer | Eva:
    """The spec's timm model with its pretrained weights: shipped file, HF cache, or timm's hub."""
    local = spec.weights_path or _cached_hub_file(spec)
    if local is not None:
        return load_checkpoint_into(create_timm_from_spec(spec), local)
    if not _hub_reachable():
        raise OfflineWeightsError(
            f"Pretrained weights for {spec.alias!r} ({spec.hub_name}) are not in the local cache and the "
            "Hugging Face hub cannot be reached. Load offline with "
            f"HookedViT.from_pretrained({spec.alias!r}, checkpoint_path='/path/to/weights.pth') "
            f"(a timm or original DeiT-III checkpoint), or download once on a connected machine with "
            f"timm.create_model({spec.hub_name!r}, pretrained=True) and copy the Hugging Face cache "
            "(~/.cache/huggingface, or $HF_HOME) here."
        )
    return timm.create_model(spec.hub_name, pretrained=True, **spec.timm_kwargs)
