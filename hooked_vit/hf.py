"""Hugging Face ``transformers`` vision models as :class:`~hooked_vit.HookedViT` (``HookedViT.from_hf``).

The HF model's config and weights are converted to the equivalent timm ``VisionTransformer``
(:func:`timm_from_hf`), which ``HookedViT.from_timm`` then wraps: one exact code path for every source.
Supported classes and the output the hooked forward returns (the HF model's main output):

- ``ViTForImageClassification``: ``logits`` (classifier on the final-norm CLS token);
  ``ViTModel`` built with ``add_pooling_layer=False``: the final-norm CLS token
  (``last_hidden_state[:, 0]``). Its default pooler (Linear + tanh on CLS) is refused.
- ``Dinov2Model`` / ``Dinov2WithRegistersModel``: ``pooler_output`` (the final-norm CLS token).
- ``Dinov2ForImageClassification`` / ``Dinov2WithRegistersForImageClassification``: ``logits`` of its
  classifier on the final-norm CLS token and mean patch token side by side (HookedViT pooling
  ``'token_avg'``, ``hook_pooled`` ``[batch, 2 d_model]``). timm has no such pooling: these load through
  ``HookedViT.from_hf`` only (the backbone through the timm twin, then the classifier), and the result
  has no ``to_timm()``.
- ``CLIPVisionModel``: ``pooler_output`` (``post_layernorm`` of CLS);
  ``CLIPVisionModelWithProjection``: ``image_embeds`` (that, times the bias-free projection).
- ``SiglipVisionModel``: ``pooler_output`` (the attention-pool head's output).

HF details kept exactly: each family's LayerNorm eps, the class position inside the position
embedding (timm ``no_embed_class=False``; with registers the class position is added to the class
token once, as timm stores DINOv2 with registers), DINOv2's LayerScale and registers, CLIP's
``pre_layrnorm`` (timm ``norm_pre``), QuickGELU, its bias-free patch embedding and projection (a zero
head bias), SigLIP's tanh GELU, missing class token and attention-pool head. The HookedViT runs at the
config's ``image_size`` unless ``img_size`` is given; then the position embedding is resampled once as
HF resamples it at run time (bicubic, ``align_corners=False``, in float32; antialiased for DINOv2 with
registers), so the hooked model equals the HF model fed images of that size (DINOv2 resamples by
itself; the others with ``interpolate_pos_encoding=True``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from hooked_vit.errors import UnsupportedModelError, check
from hooked_vit.loading import check_state_dict, config_from_timm, timm_to_hooked_state_dict

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class _Family:
    """How one HF family maps onto timm: its eval preprocessing (the released checkpoints' image
    processor settings, at the model's own image size) and architecture switches."""

    mean: list[float]
    std: list[float]
    interpolation: str
    crop_pct: float
    crop_mode: str  # timm's: "center" (resize the short side, centre crop) or "squash" (resize to a square)
    class_token: bool = True
    pre_norm: bool = False
    attention_pool: bool = False


# ViTImageProcessor: 224x224 bilinear, mean/std 0.5; BitImageProcessor as saved with the DINOv2
# checkpoints: short side 256, centre crop 224, bicubic, ImageNet mean/std; CLIPImageProcessor: short
# side 224, centre crop 224, bicubic, OpenAI CLIP mean/std; SiglipImageProcessor: 224x224 bicubic, 0.5.
_FAMILIES = {
    "vit": _Family([0.5] * 3, [0.5] * 3, "bilinear", 1.0, "squash"),
    "dinov2": _Family(IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224 / 256, "center"),
    "clip": _Family(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", 1.0, "center", pre_norm=True),
    "siglip": _Family([0.5] * 3, [0.5] * 3, "bicubic", 1.0, "squash", class_token=False, attention_pool=True),
}

# class name -> (family, head): "classifier" (logits), "projection" (image_embeds), None (pooled features)
SUPPORTED = {
    "ViTModel": ("vit", None),
    "ViTForImageClassification": ("vit", "classifier"),
    "Dinov2Model": ("dinov2", None),
    "Dinov2WithRegistersModel": ("dinov2", None),
    "CLIPVisionModel": ("clip", None),
    "CLIPVisionModelWithProjection": ("clip", "projection"),
    "SiglipVisionModel": ("siglip", None),
}

# HF activation name -> timm act_layer (None: timm's default, exact nn.GELU)
_ACTIVATIONS = {"gelu": None, "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}

# HF parameter names (transformers 4 and 5 spellings) -> timm names; applied after the backbone prefix
# (vit., dinov2., dinov2_with_registers., vision_model.) is removed. q/k/v are fused into qkv afterwards.
_BACKBONE_PREFIX = re.compile(r"^(vit|dinov2|dinov2_with_registers|vision_model)\.")
_RULES = [(re.compile(pattern), repl) for pattern, repl in [
    (r"^(?:encoder\.)?layers?\.(\d+)\.", r"blocks.\1."),
    (r"\.(?:attention\.attention\.query|attention\.q_proj|self_attn\.q_proj)\.", ".attn.q."),
    (r"\.(?:attention\.attention\.key|attention\.k_proj|self_attn\.k_proj)\.", ".attn.k."),
    (r"\.(?:attention\.attention\.value|attention\.v_proj|self_attn\.v_proj)\.", ".attn.v."),
    (r"\.(?:attention\.output\.dense|attention\.o_proj|self_attn\.out_proj)\.", ".attn.proj."),
    (r"\.(?:layernorm_before|layer_norm1)\.", ".norm1."),
    (r"\.(?:layernorm_after|layer_norm2)\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"^(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"^embeddings\.(?:cls_token|class_embedding)$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.(?:position_embeddings|position_embedding\.weight)$", "pos_embed"),
    (r"^embeddings\.(?:patch_embeddings\.projection|patch_embedding)\.", "patch_embed.proj."),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^(?:layernorm|post_layernorm)\.", "norm."),
    (r"^classifier\.", "head."),
    (r"^visual_projection\.weight$", "head.weight"),
    (r"^head\.probe$", "attn_pool.latent"),
    (r"^head\.attention\.in_proj_", "attn_pool.in_proj."),
    (r"^head\.attention\.out_proj\.", "attn_pool.proj."),
    (r"^head\.layernorm\.", "attn_pool.norm."),
    (r"^head\.mlp\.", "attn_pool.mlp."),
]]
_KNOWN = re.compile(r"^(blocks\.\d+\.(attn\.(q|k|v|proj)|norm[12]|mlp\.fc[12])\.(weight|bias)"
                    r"|blocks\.\d+\.ls[12]\.gamma|cls_token|reg_token|pos_embed"
                    r"|(patch_embed\.proj|norm_pre|norm|head)\.(weight|bias)"
                    r"|attn_pool\.(latent|in_proj\.(weight|bias)|(proj|norm|mlp\.fc[12])\.(weight|bias)))$")
_DROPPED = ("embeddings.mask_token", "embeddings.position_ids")  # masked-image-modelling token; a buffer


def _timm_key(key: str) -> str:
    key = _BACKBONE_PREFIX.sub("", key)
    for pattern, repl in _RULES:
        key = pattern.sub(repl, key)
    return key


def _square(value: Any, name: str, problems: list[str]) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            problems.append(f"non-square {name} {tuple(value)}")
        return int(value[0])
    return int(value)


# How to load what a refused class holds.
_FIXES = {
    "Dinov2ForImageClassification": "its classifier reads the CLS token and the mean patch token side by side, which "
                                    "no timm pooling does: HookedViT.from_hf(hf_model) loads it (pooling 'token_avg'), "
                                    "timm_from_hf(hf_model.dinov2) its backbone",
    "Dinov2WithRegistersForImageClassification": "its classifier reads the CLS token and the mean patch token side by "
                                                 "side, which no timm pooling does: HookedViT.from_hf(hf_model) loads "
                                                 "it (pooling 'token_avg'), timm_from_hf(hf_model.dinov2_with_registers) "
                                                 "its backbone",
    "CLIPModel": "load its image tower, CLIPVisionModelWithProjection.from_pretrained(<the same name>)",
    "SiglipModel": "load its image tower, SiglipVisionModel.from_pretrained(<the same name>)",
}


def _family_of(hf_model: nn.Module) -> tuple[str, str | None]:
    """(family, head kind) of a supported class; a one-line refusal for anything else."""
    name = type(hf_model).__name__
    if name in SUPPORTED and type(hf_model).__module__.startswith("transformers."):
        return SUPPORTED[name]
    fix = f" ({_FIXES[name]})" if name in _FIXES else ""
    raise UnsupportedModelError(f"HookedViT.from_hf cannot load {name}{fix}; supported transformers classes: "
                                f"{', '.join(SUPPORTED)}")


def _problems(hf_model: nn.Module, family: str, config: Any) -> list[str]:
    """Features of ``hf_model`` that the timm twin cannot reproduce exactly (empty if none)."""
    problems = []
    act = getattr(config, "hidden_act", None)
    if act not in _ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (supported: {', '.join(map(repr, _ACTIVATIONS))})")
    if getattr(config, "use_swiglu_ffn", False):
        problems.append("use_swiglu_ffn=True (SwiGLU MLP)")
    if family == "vit" and getattr(hf_model, "pooler", None) is not None:
        problems.append("ViTModel's pooler (Linear + tanh on CLS; load with add_pooling_layer=False, whose output is "
                        "the final-norm CLS token, last_hidden_state[:, 0])")
    if family == "siglip" and not getattr(config, "vision_use_head", True):
        problems.append("vision_use_head=False (no pooled output)")
    if config.hidden_size % config.num_attention_heads:
        problems.append(f"hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")
    return problems


def _timm_kwargs(hf_model: nn.Module, family: str, head: str | None, config: Any,
                 problems: list[str]) -> dict[str, Any]:
    """The timm ``VisionTransformer`` arguments of ``hf_model``'s architecture."""
    spec = _FAMILIES[family]
    d_model = config.hidden_size
    d_mlp = config.intermediate_size if family != "dinov2" else int(d_model * config.mlp_ratio)
    img_size = _square(config.image_size, "image_size", problems)
    num_classes = 0
    if head == "classifier":
        num_classes = hf_model.classifier.out_features if isinstance(hf_model.classifier, nn.Linear) else 0
    elif head == "projection":
        num_classes = hf_model.visual_projection.out_features
    kwargs = dict(
        img_size=img_size, patch_size=_square(config.patch_size, "patch_size", problems),
        in_chans=config.num_channels, num_classes=num_classes, embed_dim=d_model,
        depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=(d_mlp + 0.5) / d_model,  # timm takes int(d_model * mlp_ratio): d_mlp / d_model can give d_mlp - 1
        qkv_bias=bool(getattr(config, "qkv_bias", True)), class_token=spec.class_token,
        global_pool="map" if spec.attention_pool else "token", pre_norm=spec.pre_norm,
        norm_layer=partial(TimmLayerNorm, eps=config.layer_norm_eps),
    )
    if _ACTIVATIONS.get(config.hidden_act):
        kwargs["act_layer"] = _ACTIVATIONS[config.hidden_act]
    if family == "dinov2":
        kwargs["init_values"] = 1.0  # LayerScale present; its values are copied
        registers = getattr(config, "num_register_tokens", 0)
        if registers:  # timm's DINOv2-with-registers layout: the class position lives in the class token
            kwargs.update(reg_tokens=registers, no_embed_class=True)
    if not spec.class_token:
        kwargs["no_embed_class"] = True
    return kwargs


def _timm_state_dict(hf_model: nn.Module, kwargs: dict[str, Any], problems: list[str]) -> dict[str, Tensor]:
    """``hf_model``'s weights under timm's names and layout (unmapped parameters go to ``problems``);
    tensors that need no change are ``hf_model``'s own (detached, not copied)."""
    state, unknown = {}, []
    for key, value in hf_model.state_dict().items():
        if _BACKBONE_PREFIX.sub("", key) in _DROPPED:
            continue
        name = _timm_key(key)
        if _KNOWN.match(name):
            state[name] = value.detach()
        else:
            unknown.append(re.sub(r"\.\d+\.", ".N.", key))
    if unknown:
        problems.append("parameters " + ", ".join(dict.fromkeys(unknown)))
        return {}
    d_model = kwargs["embed_dim"]
    for block in range(kwargs["depth"]):
        prefix = f"blocks.{block}.attn."
        for part in ("weight", "bias"):
            qkv = [state.pop(f"{prefix}{n}.{part}", None) for n in "qkv"]
            if all(t is not None for t in qkv):
                state[f"{prefix}qkv.{part}"] = torch.cat(qkv)
    if "cls_token" in state and state["cls_token"].dim() == 1:  # CLIP's class_embedding [d_model]
        state["cls_token"] = state["cls_token"].reshape(1, 1, d_model)
    if "pos_embed" in state and state["pos_embed"].dim() == 2:  # an nn.Embedding's weight [pos, d_model]
        state["pos_embed"] = state["pos_embed"].unsqueeze(0)
    if kwargs.get("reg_tokens"):  # DINOv2 registers: fold the class position into the class token
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    if "head.weight" in state and "head.bias" not in state:  # CLIP's bias-free projection
        state["head.bias"] = state["head.weight"].new_zeros(state["head.weight"].shape[0])
    if "attn_pool.in_proj.weight" in state:  # nn.MultiheadAttention's packed q/k/v -> timm's q and kv
        for part in ("weight", "bias"):
            packed = state.pop(f"attn_pool.in_proj.{part}")
            state[f"attn_pool.q.{part}"], state[f"attn_pool.kv.{part}"] = packed[:d_model], packed[d_model:]
    return state


def resize_position_embedding(
    pos_embed: Float[Tensor, "1 n_pos d_model"], n_prefix: int, grid: int, *, antialias: bool = False,
) -> Float[Tensor, "1 n_pos_out d_model"]:
    """The position embedding resampled to a ``grid`` x ``grid`` patch grid as ``transformers`` does
    at run time (bicubic, ``align_corners=False``, in float32; ``antialias`` as
    ``Dinov2WithRegistersModel``); the first ``n_prefix`` rows (the class position) are kept."""
    prefix, patches = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    side = round(patches.shape[1] ** 0.5)
    check(side * side == patches.shape[1],
          f"the position embedding has {patches.shape[1]} patch rows, not a square grid")
    grid_pos = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid_pos.float(), size=(grid, grid), mode="bicubic", align_corners=False,
                            antialias=antialias)
    resized = resized.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([prefix, resized], dim=1)


def _convert(hf_model: nn.Module, img_size: int | None, copy: bool) -> VisionTransformer:
    """The timm twin of ``hf_model`` (``copy=False``: it shares ``hf_model``'s tensors where it can)."""
    family, head = _family_of(hf_model)
    config = hf_model.config
    name = getattr(config, "_name_or_path", "") or type(hf_model).__name__
    problems = _problems(hf_model, family, config)
    kwargs = _timm_kwargs(hf_model, family, head, config, problems) if not problems else {}
    state = _timm_state_dict(hf_model, kwargs, problems) if not problems else {}
    if problems:
        raise UnsupportedModelError(f"HookedViT.from_hf cannot load {name} ({type(hf_model).__name__}): unsupported: "
                                    f"{'; '.join(problems)}")
    if img_size is not None and img_size != kwargs["img_size"]:
        check(isinstance(img_size, int) and img_size > 0 and img_size % kwargs["patch_size"] == 0,
              f"img_size must be a positive multiple of the patch size {kwargs['patch_size']}; got {img_size!r}")
        n_prefix = 1 if kwargs["class_token"] and not kwargs.get("no_embed_class") else 0
        antialias = type(hf_model).__name__.startswith("Dinov2WithRegisters")  # as its interpolate_pos_encoding
        state["pos_embed"] = resize_position_embedding(state["pos_embed"], n_prefix, img_size // kwargs["patch_size"],
                                                       antialias=antialias)
        kwargs["img_size"] = img_size
    with torch.device("meta"):  # no random init: every parameter is assigned below
        timm_model = VisionTransformer(**kwargs)
    check_state_dict(state, timm_model, f"{name} (converted from {type(hf_model).__name__})")
    timm_model.load_state_dict({k: v.clone() for k, v in state.items()} if copy else state, assign=True)
    spec = _FAMILIES[family]
    size = kwargs["img_size"]
    timm_model.pretrained_cfg = dict(architecture=name, mean=list(spec.mean), std=list(spec.std),
                                     interpolation=spec.interpolation, crop_pct=spec.crop_pct,
                                     crop_mode=spec.crop_mode, input_size=(kwargs["in_chans"], size, size))
    return timm_model.eval()


def timm_from_hf(hf_model: nn.Module, *, img_size: int | None = None) -> VisionTransformer:
    """The timm ``VisionTransformer`` computing ``hf_model``'s main output (weights copied, same
    device and dtype), at ``img_size`` (default: the config's ``image_size``). Raises
    :class:`~hooked_vit.errors.UnsupportedModelError`, one line naming every unsupported feature,
    before any weight is copied."""
    return _convert(hf_model, img_size, copy=True)


# transformers classifiers reading CLS and the mean patch token side by side -> their backbone's attribute
_TOKEN_AVG_CLASSIFIERS = {"Dinov2ForImageClassification": "dinov2",
                          "Dinov2WithRegistersForImageClassification": "dinov2_with_registers"}


def hooked_from_hf(cls: type, hf_model: nn.Module, *, img_size: int | None = None, **cfg_overrides: Any) -> Any:
    """``cls.from_timm`` of :func:`timm_from_hf`'s twin (the weights are copied once); the config's
    ``model_name`` is ``hf:<name_or_path>``, its preprocessing the family's image-processor settings.
    DINOv2's ``...ForImageClassification``: the backbone's twin with pooling ``'token_avg'`` and the
    classifier as ``head``."""
    kind = type(hf_model).__name__
    if kind in _TOKEN_AVG_CLASSIFIERS and type(hf_model).__module__.startswith("transformers."):
        return _token_avg_classifier(cls, hf_model, getattr(hf_model, _TOKEN_AVG_CLASSIFIERS[kind]), img_size,
                                     cfg_overrides)
    timm_model = _convert(hf_model, img_size, copy=False)
    overrides = {"model_name": f"hf:{timm_model.pretrained_cfg['architecture']}", **cfg_overrides}
    return cls.from_timm(timm_model, **overrides)


def _token_avg_classifier(cls: type, hf_model: nn.Module, backbone: nn.Module, img_size: int | None,
                          cfg_overrides: dict[str, Any]) -> Any:
    """A DINOv2 classifier: ``backbone``'s twin, pooling ``'token_avg'``, ``hf_model.classifier`` as ``head``."""
    classifier = hf_model.classifier
    check(isinstance(classifier, nn.Linear),
          f"{type(hf_model).__name__} has no classifier (num_labels=0); load its backbone, whose output is the "
          "final-norm CLS token")
    timm_model = _convert(backbone, img_size, copy=False)
    name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    overrides = {"model_name": f"hf:{name}", **cfg_overrides, "pooling": "token_avg",
                 "n_classes": classifier.out_features}
    cfg = config_from_timm(timm_model, **overrides)
    with torch.device("meta"):  # no random init: every parameter is assigned below
        model = cls(cfg)
    state = timm_to_hooked_state_dict(timm_model.state_dict(), cfg)
    state.update({"head.weight": classifier.weight, "head.bias": classifier.bias})
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
    return model.eval()
