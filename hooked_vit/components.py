"""Building blocks of a hooked DeiT-III / ViT, numerically identical to timm's modules.

Parameter names follow timm (``qkv``, ``proj``, ``fc1``, ``fc2``, ``ls1.gamma``) so that a state dict
converts by renaming the norms only; hook names follow TransformerLens. Every hook's value is the
tensor used downstream, so a hook that returns a new tensor replaces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig


class LayerNorm(nn.Module):
    """LayerNorm with its scale and output hooked.

    Runs ``F.layer_norm`` (timm's kernel) unless ``hook_scale`` is hooked; then runs the explicit
    ``(x - mean) / scale * w + b`` so the hooked scale (e.g. detached for LRP) is the one used.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1]: sqrt(var + eps)
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]: LayerNorm output (after w, b)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.hook_scale.has_hooks():
            out = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        else:
            x = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            out = x / scale * self.weight + self.bias
        return self.hook_normalized(out)


class Attention(nn.Module):
    """Multi-head self-attention on timm's fused ``qkv`` weight, with per-head hooks.

    Uses ``F.scaled_dot_product_attention`` unless ``hook_attn_scores`` or ``hook_pattern`` is
    hooked; then materialises scores and pattern explicitly.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.scale = self.d_head**-0.5
        self.use_attn_result = cfg.use_attn_result
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]: q.k / sqrt(d_head)
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]: softmax of the scores
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]: pattern-weighted values
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]: per-head output (use_attn_result)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        batch, pos, _ = x.shape
        q, k, v = self.qkv(x).view(batch, pos, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        # [batch, head, pos, d_head] views, laid out in memory as timm's are.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            scores = self.hook_attn_scores((q * self.scale) @ k.transpose(-2, -1))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        z = self.hook_z(z.transpose(1, 2))
        if not self.use_attn_result:
            return self.proj(z.reshape(batch, pos, self.n_heads * self.d_head))
        w_o = self.proj.weight.view(-1, self.n_heads, self.d_head)  # [d_model, head, d_head]
        result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w_o))
        return result.sum(dim=2) + self.proj.bias


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2, with pre- and post-activation hooks."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: fc1 output
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]: GELU output (the mlp_act site)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.fc2(self.hook_post(F.gelu(self.hook_pre(self.fc1(x)))))


class LayerScale(nn.Module):
    """Learned per-channel scale ``gamma`` on a sub-block output (DeiT-III)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return x * self.gamma


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + ls1(attn(ln1(x)))`` then ``x + ls2(mlp(ln2(x)))``."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        # Registered in execution order, so model.hook_dict lists hooks in the order they fire.
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.d_model) if cfg.layer_scale else nn.Identity()
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]: after LayerScale, before the add
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.ls2 = LayerScale(cfg.d_model) if cfg.layer_scale else nn.Identity()
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]: after LayerScale, before the add
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.ls1(self.attn(self.ln1(x)))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.ls2(self.mlp(self.ln2(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided conv, as timm's ``patch_embed.proj``."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)

    def forward(
        self, images: Float[Tensor, "batch channel height width"]
    ) -> Float[Tensor, "batch n_patches d_model"]:
        return self.proj(images).flatten(2).transpose(1, 2)
