"""Conversion between timm ``VisionTransformer`` instances and :class:`HookedViTConfig` + state
dict, and loading of weights (shipped file, local checkpoint, timm's hub)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.layers import Mlp
from timm.layers.attention import Attention as TimmAttention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import (
    CheckpointMismatchError,
    CorruptFileError,
    MissingFileError,
    OfflineWeightsError,
    UnsupportedModelError,
    short_exception,
)
from hooked_vit.pretrained import PretrainedSpec




# Hooked names differ from timm's only in the norms (TransformerLens names them ln1/ln2/ln_final).
_TO_HOOKED = [(re.compile(r"(^|\.)norm1\."), r"\1ln1."), (re.compile(r"(^|\.)norm2\."), r"\1ln2."),
              (re.compile(r"^norm\."), "ln_final.")]
_TO_TIMM = [(re.compile(r"(^|\.)ln1\."), r"\1norm1."), (re.compile(r"(^|\.)ln2\."), r"\1norm2."),
            (re.compile(r"^ln_final\."), "norm.")]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def timm_to_hooked_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm keys (``blocks.0.norm1.weight``) to hooked keys (``blocks.0.ln1.weight``)."""
    return {_rename(k, _TO_HOOKED): v for k, v in state_dict.items()}


def hooked_to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`timm_to_hooked_state_dict`."""
    return {_rename(k, _TO_TIMM): v for k, v in state_dict.items()}


def _is(module: nn.Module, kind: type) -> bool:
    return type(module) is kind


def unsupported_features(model: nn.Module) -> list[str]:
    """Every feature of ``model`` that HookedViT cannot reproduce exactly (empty if supported)."""
    if not isinstance(model, VisionTransformer):
        return [f"{type(model).__name__} is not a timm VisionTransformer"]
    problems = []
    if model.cls_token is None:
        problems.append("no class token (class_token=False)")
    if model.reg_token is not None:
        problems.append(f"register tokens (reg_tokens={model.num_reg_tokens})")
    if model.pos_embed is None:
        problems.append("no learned absolute position embedding")
    if model.dynamic_img_size:
        problems.append("dynamic_img_size=True")
    if model.global_pool != "token":
        problems.append(f"global_pool={model.global_pool!r} (supported: 'token', the CLS token)")
    if getattr(model, "attn_pool", None) is not None:
        problems.append("attention pooling head")
    for name in ("norm_pre", "fc_norm", "patch_drop"):
        if not _is(getattr(model, name, nn.Identity()), nn.Identity):
            problems.append(f"{name} is {type(getattr(model, name)).__name__}, expected Identity")
    if not _is(model.patch_embed.norm, nn.Identity):
        problems.append("a norm after the patch embedding")
    if not isinstance(model.norm, nn.LayerNorm):
        problems.append(f"final norm is {type(model.norm).__name__}, expected LayerNorm")
    for i, block in enumerate(model.blocks):
        where = f"blocks.{i}"
        if not _is(block, Block):
            problems.append(f"{where} is {type(block).__name__}, expected timm Block")
            continue
        attn, mlp = block.attn, block.mlp
        if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
            problems.append(f"{where} norms are not LayerNorm")
        if not isinstance(attn, TimmAttention):
            problems.append(f"{where}.attn is {type(attn).__name__}, expected timm Attention")
        else:
            for name in ("q_norm", "k_norm", "norm"):
                if not _is(getattr(attn, name, nn.Identity()), nn.Identity):
                    problems.append(f"{where}.attn.{name} (qk_norm / scale_attn_norm)")
            if getattr(attn, "gate", None) is not None:
                problems.append(f"{where}.attn has a gate")
        if not _is(mlp, Mlp) or not _is(mlp.norm, nn.Identity):
            problems.append(f"{where}.mlp is {type(mlp).__name__}, expected plain timm Mlp")
        elif not (_is(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            problems.append(f"{where}.mlp activation is {mlp.act}, expected exact GELU")
        for name in ("ls1", "ls2"):
            if type(getattr(block, name)).__name__ not in ("LayerScale", "Identity"):
                problems.append(f"{where}.{name} is {type(getattr(block, name)).__name__}")
    layer_scales = {type(b.ls1).__name__ for b in model.blocks if _is(b, Block)}
    if len(layer_scales) > 1:
        problems.append("LayerScale on some blocks only")
    return problems


def config_from_timm(model: nn.Module, **overrides) -> HookedViTConfig:
    """The :class:`HookedViTConfig` of a supported timm model; raises
    :class:`UnsupportedModelError` listing every unsupported feature otherwise."""
    problems = unsupported_features(model)
    if problems:
        raise UnsupportedModelError(
            "HookedViT supports timm VisionTransformers of the DeiT-III / ViT kind; this model has: "
            + "; ".join(problems)
        )
    patch = model.patch_embed
    img_h, img_w = patch.img_size
    if img_h != img_w or patch.patch_size[0] != patch.patch_size[1]:
        raise UnsupportedModelError(f"non-square images or patches ({patch.img_size}, {patch.patch_size})")
    block = model.blocks[0]
    layer_scale = type(block.ls1).__name__ == "LayerScale"
    d_model, d_mlp = model.embed_dim, block.mlp.fc1.out_features
    timm_kwargs = dict(
        img_size=img_h, patch_size=patch.patch_size[0], in_chans=patch.proj.in_channels,
        num_classes=model.num_classes, embed_dim=d_model, depth=len(model.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=d_mlp / d_model,
        qkv_bias=block.attn.qkv.bias is not None, init_values=1.0 if layer_scale else None,
        no_embed_class=model.no_embed_class, class_token=True, global_pool=model.global_pool,
    )
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained_cfg.items()
                     if k in ("mean", "std", "crop_pct", "crop_mode", "interpolation")}
    preprocessing["input_size"] = [patch.proj.in_channels, img_h, img_w]  # the model's, not the tag's
    if model.num_classes == 0 or not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError("a classifier head (nn.Linear) is required; got num_classes=0")
    cfg = dict(
        img_size=img_h, patch_size=patch.patch_size[0], in_chans=patch.proj.in_channels,
        d_model=d_model, n_layers=len(model.blocks), n_heads=block.attn.num_heads, d_mlp=d_mlp,
        n_classes=model.num_classes, layer_scale=layer_scale, no_embed_class=model.no_embed_class,
        qkv_bias=block.attn.qkv.bias is not None, ln_eps=block.norm1.eps,
        model_name=pretrained_cfg.get("architecture", "custom"), timm_kwargs=timm_kwargs,
        preprocessing=preprocessing,
    )
    cfg.update(overrides)
    return HookedViTConfig(**cfg)


def build_timm_model(cfg: HookedViTConfig) -> VisionTransformer:
    """A fresh timm ``VisionTransformer`` of ``cfg``'s architecture (weights not loaded)."""
    model = VisionTransformer(**cfg.timm_kwargs)
    if cfg.preprocessing:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **cfg.preprocessing,
                                "architecture": cfg.timm_name or cfg.model_name}
    return model


def create_timm_from_spec(spec: PretrainedSpec, **kwargs) -> VisionTransformer:
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

    repo = f"timm/{spec.hub_name}"
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


def load_pretrained_timm(spec: PretrainedSpec) -> VisionTransformer:
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
