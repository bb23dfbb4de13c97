"""Checks of timm building blocks shared by the conversions of timm's ``VisionTransformer``
(:mod:`hooked_vit.loading`) and ``Eva`` (:mod:`hooked_vit.eva`): which parts HookedViT reproduces exactly."""

from __future__ import annotations

from timm.layers import AttentionPoolLatent, Mlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh, QuickGELU
from torch import nn


def is_exactly(module: nn.Module, kind: type) -> bool:
    return type(module) is kind


# Module kinds (class-name fragments) of other architectures, named in a refusal.
FOREIGN_PARTS = [
    ("relative_position_bias", "relative position bias", "param"),
    ("RelPos", "relative position bias", "module"),
    ("Rope", "rotary position embeddings", "module"),
    ("RotaryEmbedding", "rotary position embeddings", "module"),
    ("SwiGLU", "SwiGLU MLP", "module"),
    ("GluMlp", "gated (GLU) MLP", "module"),
    ("PatchMerging", "hierarchical patch merging (Swin)", "module"),
    ("WindowAttention", "windowed attention (Swin)", "module"),
    ("AttentionPoolPrr", "PRR attention pool (global_pool='prr')", "module"),
    ("RmsNorm", "RMSNorm", "module"),
]


def foreign_parts(model: nn.Module) -> list[str]:
    """Known unsupported building blocks found anywhere in ``model`` (by module class or parameter name)."""
    found = []
    module_kinds = {type(m).__name__ for m in model.modules()}
    param_names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    for part, label, where in FOREIGN_PARTS:
        hit = (any(part in name for name in param_names) if where == "param"
               else any(part in kind for kind in module_kinds))
        if hit and label not in found:
            found.append(label)
    return found


def is_layer_norm(norm: nn.Module) -> bool:
    return (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
            and len(norm.normalized_shape) == 1)


def act_fn_name(act: nn.Module) -> str | None:
    """The :data:`~hooked_vit.config.ACT_FNS` name of a timm MLP activation module, ``None`` if unsupported."""
    if is_exactly(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(act.approximate)
    return {TimmGELU: "gelu", GELUTanh: "gelu_pytorch_tanh", QuickGELU: "quick_gelu"}.get(type(act))


# act_fn -> timm's act_layer argument (None: timm's default, nn.GELU)
TIMM_ACT_LAYER = {"gelu": None, "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def attn_pool_problems(pool: nn.Module, model: nn.Module) -> list[str]:
    """Unsupported features of a ``global_pool='map'`` head (timm's ``AttentionPoolLatent``)."""
    if not is_exactly(pool, AttentionPoolLatent):
        return [f"attention pool {type(pool).__name__} (expected timm AttentionPoolLatent)"]
    problems = []
    if pool.latent_len != 1 or pool.pool != "token":
        problems.append(f"attention pool with {pool.latent_len} latents / pool {pool.pool!r} (supported: 1 latent)")
    if pool.pos_embed is not None:
        problems.append("attention pool with its own position embedding")
    if not (is_exactly(pool.q_norm, nn.Identity) and is_exactly(pool.k_norm, nn.Identity)):
        problems.append("attention pool qk_norm")
    q_ok = isinstance(pool.q, nn.Linear) and pool.q.bias is not None
    if not q_ok or pool.kv.bias is None or pool.latent.shape[-1] != model.embed_dim:
        problems.append("attention pool without q projection, q/kv bias or latent of the model's width")
    block = model.blocks[0] if len(model.blocks) else None
    heads = getattr(getattr(block, "attn", None), "num_heads", None)
    if pool.num_heads != heads or pool.kv.in_features != model.embed_dim:
        problems.append(f"attention pool with {pool.num_heads} heads / width {pool.kv.in_features} (expected the blocks')")
    mlp = pool.mlp
    if mlp is None or not isinstance(pool.proj, nn.Linear) or pool.proj.bias is None:
        problems.append("attention pool without its output projection and MLP (out_features=0)")
    elif not is_layer_norm(pool.norm):
        problems.append(f"attention pool norm {type(pool.norm).__name__}, expected LayerNorm")
    elif not (is_exactly(mlp, Mlp) and is_exactly(mlp.norm, nn.Identity) and isinstance(mlp.fc1, nn.Linear)
              and mlp.fc1.bias is not None and isinstance(getattr(block, "mlp", None), Mlp)
              and mlp.fc1.out_features == block.mlp.fc1.out_features
              and act_fn_name(mlp.act) is not None and act_fn_name(mlp.act) == act_fn_name(block.mlp.act)):
        problems.append("attention pool MLP unlike the blocks' (width, activation or bias)")
    return problems




def patch_embed_problems(patch: nn.Module, norm_pre: nn.Module, *, allow_dynamic: bool = False) -> list[str]:
    """Unsupported features of a timm ``PatchEmbed`` (square conv patches, bias exactly without
    ``norm_pre``); ``allow_dynamic``: a dynamic-size embedding (NHWC output, timm's Eva) is run at its
    ``img_size``."""
    if type(patch) is not TimmPatchEmbed or not isinstance(patch.proj, nn.Conv2d) or (
            not patch.flatten and not allow_dynamic):
        return [f"patch embedding {type(patch).__name__} (expected timm PatchEmbed, conv + flatten)"]
    problems = []
    if getattr(patch, "dynamic_img_pad", False):
        problems.append("dynamic_img_pad=True")
    if (patch.proj.bias is None) != (not is_exactly(norm_pre, nn.Identity)):
        problems.append("patch embedding bias with norm_pre, or none without (timm's pre_norm sets both)")
    if not is_exactly(patch.norm, nn.Identity):
        problems.append("a norm after the patch embedding")
    if patch.img_size[0] != patch.img_size[1] or patch.patch_size[0] != patch.patch_size[1]:
        problems.append(f"non-square images or patches ({patch.img_size}, {patch.patch_size})")
    if patch.proj.stride != patch.proj.kernel_size:
        problems.append("overlapping patches")
    return problems


def mlp_ratio(d_model: int, d_mlp: int) -> float:
    """The ``mlp_ratio`` timm turns back into ``d_mlp`` (``int(d_model * ratio)``): the plain ratio
    where it does, else one nudged by half a unit (e.g. d_model 176, d_mlp 240)."""
    ratio = d_mlp / d_model
    return ratio if int(d_model * ratio) == d_mlp else (d_mlp + 0.5) / d_model


def norm_and_attention_problems(block: nn.Module) -> list[str]:
    """What a pre-norm block (timm ``Block`` or ``EvaBlock``) may not have: norms other than LayerNorm,
    qk-norm, gated attention."""
    problems = []
    if not (is_layer_norm(block.norm1) and is_layer_norm(block.norm2)):
        problems.append("block norms that are not LayerNorm")
    attn = block.attn
    if not (is_exactly(getattr(attn, "q_norm", nn.Identity()), nn.Identity)
            and is_exactly(getattr(attn, "k_norm", nn.Identity()), nn.Identity)):
        problems.append("qk_norm")
    if getattr(attn, "gate", None) is not None:
        problems.append("gated attention")
    return problems

