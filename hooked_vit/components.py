"""Building blocks of a hooked DeiT-III / ViT, numerically identical to timm's modules.

Parameter names follow timm (``qkv``, ``proj``, ``fc1``, ``fc2``, ``ls1.gamma``) so that a state dict
converts by renaming the norms only; hook names follow TransformerLens. Every hook's value is the
tensor used downstream, so a hook that returns a new tensor replaces it and a hook that edits its
value in place edits the computation (as in TransformerLens).

Weight views in TransformerLens's names and shapes (``attn.W_Q`` ``[head, d_model, d_head]``,
``attn.W_O`` ``[head, d_head, d_model]``, ``mlp.W_in`` ``[d_model, d_mlp]``, ...) are read off the
timm parameters. ``W_O``/``b_O`` and ``W_out``/``b_out`` include the block's LayerScale, because the
sub-block output that reaches the residual stream (``hook_attn_out``, ``hook_mlp_out``) does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from timm.layers.pos_embed_sincos import apply_rot_embed_cat, create_rope_embed
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig

READ_ONLY = "_hooked_vit_read_only"  # attribute marking a hook function that never edits its argument


def mark_read_only(hook: Callable) -> Callable:
    """Mark ``hook`` (a function or ``functools.partial``) as one that only reads its activation, as
    ``run_with_cache``'s caching hooks do: a value hooked only by such hooks needs no private copy."""
    setattr(hook, READ_ONLY, True)
    return hook


def may_edit(hook_point: HookPoint) -> bool:
    """Whether a hook on ``hook_point`` may edit its value in place (so that value needs its own
    memory when autograd reads it later): any backward hook, or a forward hook not marked read-only."""
    if hook_point.bwd_hooks:
        return True
    return any(not getattr(handle.user_hook, READ_ONLY, False) for handle in hook_point.fwd_hooks)


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

    def forward(self, x: Float[Tensor, "batch *pos_head d_model"]) -> Float[Tensor, "batch *pos_head d_model"]:
        """``[batch, pos, d_model]`` (with a head axis for TL's split inputs), or pooled ``[batch, d_model]`` (fc_norm)."""
        if not self.hook_scale.has_hooks():
            out = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        else:
            x = x - x.mean(-1, keepdim=True)
            # sqrt's backward reads its output: a copy leaves it intact under in-place hook edits
            scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
            scale = self.hook_scale(scale.clone() if may_edit(self.hook_scale) else scale)
            out = x / scale * self.weight + self.bias
        return self.hook_normalized(out)

    @property
    def w(self) -> Float[Tensor, "d_model"]:
        """TransformerLens's name for the scale (all ones after ``fold_ln``)."""
        return self.weight

    @property
    def b(self) -> Float[Tensor, "d_model"]:
        """TransformerLens's name for the bias (zero after ``fold_ln``)."""
        return self.bias


def _layer_scale_gamma(layer_scale: nn.Module) -> Tensor | None:
    """The LayerScale's ``gamma`` ``[d_model]``, or ``None`` for a model without LayerScale."""
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None


class LayerScale(nn.Module):
    """Learned per-channel scale ``gamma`` on a sub-block output (DeiT-III)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return x * self.gamma


def attend(q: Float[Tensor, "batch head q_pos d_head"], k: Float[Tensor, "batch head k_pos d_head"],
           v: Float[Tensor, "batch head k_pos d_head"], scale: float, hook_attn_scores: HookPoint,
           hook_pattern: HookPoint, hook_z: HookPoint) -> Float[Tensor, "batch q_pos head d_head"]:
    """Softmax attention with its hooks: ``F.scaled_dot_product_attention`` unless the scores or the
    pattern are hooked, then explicit scores ``[batch, head, q_pos, k_pos]`` and pattern; returns the
    hooked ``z``."""
    if hook_attn_scores.has_hooks() or hook_pattern.has_hooks():
        scores = hook_attn_scores((q * scale) @ k.transpose(-2, -1))
        # softmax's backward reads its output: a copy leaves it intact under in-place hook edits
        pattern = scores.softmax(dim=-1)
        pattern = hook_pattern(pattern.clone() if may_edit(hook_pattern) else pattern)
        z = pattern @ v
    else:
        z = F.scaled_dot_product_attention(q, k, v)
    z = z.transpose(1, 2)
    # sdpa's backward reads its output too; copy (same strides) only when a hook may edit z
    return hook_z(z.clone() if may_edit(hook_z) else z)


class Attention(nn.Module):
    """Multi-head self-attention on timm's fused ``qkv`` weight, with per-head hooks; returns the
    output after the block's LayerScale (``layer_scale``, held but registered by the block, so its
    parameter stays ``blocks.{L}.ls1.gamma``).

    Uses ``F.scaled_dot_product_attention`` unless ``hook_attn_scores`` or ``hook_pattern`` is
    hooked; then materialises scores and pattern explicitly. With ``use_attn_result`` each head's
    LayerScaled output is ``hook_result``; the heads' results plus ``b_O`` sum to ``hook_attn_out``.
    """

    def __init__(self, cfg: HookedViTConfig, layer_scale: nn.Module, rope: nn.Module | None = None):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.scale = self.d_head**-0.5
        self.use_attn_result = cfg.use_attn_result
        self.n_prefix_tokens, self.grid_size = cfg.n_prefix_tokens, cfg.grid_size
        self.__dict__["layer_scale"] = layer_scale  # not a submodule: the block owns it
        self.__dict__["rope"] = rope  # not a submodule: the model owns the rotary table (shared by the blocks)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        if rope is not None:  # TransformerLens's names: q and k after the rotation (prefix tokens unrotated)
            self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head]
            self.hook_rot_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]: q.k / sqrt(d_head)
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]: softmax of the scores
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]: pattern-weighted values
        if cfg.attn_norm:  # EVA-02 CLIP: LayerNorm on the concatenated heads' z, proj's input
            self.norm = LayerNorm(cfg.d_model, cfg.ln_eps)
        if not cfg.attn_norm:  # no per-head outputs through a LayerNorm across the heads
            self.hook_result = HookPoint()  # [batch, pos, head, d_model]: per-head output after LayerScale

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"],
        key_input: Float[Tensor, "batch pos head d_model"] | None = None,
        value_input: Float[Tensor, "batch pos head d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``x`` is the normalized residual stream, or (TransformerLens's ``use_attn_in`` /
        ``use_split_qkv_input``) per-head query inputs ``[batch, pos, head, d_model]``, with per-head
        ``key_input`` and ``value_input`` (default: ``x``); head ``h``'s q, k, v read slice ``h``."""
        batch, pos = x.shape[:2]
        if x.ndim == 4:
            inputs = (x, x if key_input is None else key_input, x if value_input is None else value_input)
            q, k, v = (hook(self._per_head_linear(inp, which))
                       for which, (hook, inp) in enumerate(zip((self.hook_q, self.hook_k, self.hook_v), inputs)))
        else:
            qkv = self.qkv(x).view(batch, pos, 3, self.n_heads, self.d_head)
            # Single-view selects (not unbind's multi-views), so a hook may edit q, k or v in place.
            q, k, v = self.hook_q(qkv[:, :, 0]), self.hook_k(qkv[:, :, 1]), self.hook_v(qkv[:, :, 2])
        # [batch, head, pos, d_head] views, laid out in memory as timm's are.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rope is not None:
            table = rotary_table(self.rope, self.grid_size)
            q = self.hook_rot_q(self._rotate(q, table, v).transpose(1, 2)).transpose(1, 2)
            k = self.hook_rot_k(self._rotate(k, table, v).transpose(1, 2)).transpose(1, 2)
        z = attend(q, k, v, self.scale, self.hook_attn_scores, self.hook_pattern, self.hook_z)
        if not self.use_attn_result:
            z = z.reshape(batch, pos, self.n_heads * self.d_head)
            return self.layer_scale(self.proj(self.norm(z) if hasattr(self, "norm") else z))
        result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
        return result.sum(dim=2) + self.b_O

    def _rotate(self, x: Float[Tensor, "batch head pos d_head"], table: Float[Tensor, "n_patches two_d_head"],
                like: Tensor) -> Float[Tensor, "batch head pos d_head"]:
        """timm Eva's rotation: the patch positions rotated by ``table`` (sin then cos), the prefix
        tokens (CLS, registers) left as they are."""
        n = self.n_prefix_tokens
        rotated = apply_rot_embed_cat(x[:, :, n:], table, half=self.rope.rotate_half)
        return torch.cat([x[:, :, :n], rotated], dim=2).type_as(like)

    # ---------------------------------------------------------------- TransformerLens weight views
    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self._w_qkv(0)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._w_qkv(1)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._w_qkv(2)

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return self._b_qkv(0)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._b_qkv(1)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._b_qkv(2)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """``proj`` per head, LayerScale folded in: ``z[h] @ W_O[h]`` is head ``h``'s ``hook_result``."""
        weight = self.proj.weight  # [d_model, head * d_head]
        gamma = _layer_scale_gamma(self.layer_scale)
        if gamma is not None:
            weight = weight * gamma[:, None]
        return weight.view(-1, self.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        """``proj`` bias, LayerScale folded in."""
        gamma = _layer_scale_gamma(self.layer_scale)
        return self.proj.bias if gamma is None else self.proj.bias * gamma

    def _per_head_linear(self, x: Float[Tensor, "batch pos head d_model"], which: int
                         ) -> Float[Tensor, "batch pos head d_head"]:
        """q (0), k (1) or v (2) of each head from its own input slice: ``x[:, :, h] @ W[h] + b[h]``."""
        out = torch.einsum("bphm,hmd->bphd", x, self._w_qkv(which))
        return out + self._b_qkv(which) if self.qkv.bias is not None else out

    def _w_qkv(self, which: int) -> Float[Tensor, "head d_model d_head"]:
        weight = self.qkv.weight.view(3, self.n_heads, self.d_head, -1)[which]  # [head, d_head, d_model]
        return weight.transpose(1, 2)

    def _b_qkv(self, which: int) -> Float[Tensor, "head d_head"]:
        if self.qkv.bias is None:
            return self.qkv.weight.new_zeros(self.n_heads, self.d_head)
        return self.qkv.bias.view(3, self.n_heads, self.d_head)[which]


def build_rope(settings: dict[str, Any] | None, d_model: int, n_heads: int, grid_size: int) -> nn.Module | None:
    """timm's rotary position embedding of ``settings`` (a config's ``rope``; ``None`` without), built as
    timm's ``Eva`` builds it for a ``grid_size`` x ``grid_size`` patch grid; its sin/cos tables are
    non-persistent buffers, computed here on the CPU (so also when the model is built on the meta
    device) and moved with the model."""
    if settings is None:
        return None
    kwargs = dict(settings)
    rope_type = kwargs.pop("rope_type")
    if rope_type == "cat":
        kwargs.update(in_pixels=False, feat_shape=[grid_size, grid_size])
    with torch.device("cpu"):  # also inside HookedViT's meta-device construction
        return create_rope_embed(rope_type=rope_type, dim=d_model, num_heads=n_heads, **kwargs)


def rotary_table(rope: nn.Module, grid_size: int) -> Float[Tensor, "n_patches two_d_head"]:
    """The rotary table ``[n_patches, 2 * d_head]`` (sin then cos) of a ``grid_size`` x ``grid_size`` patch grid."""
    if getattr(rope, "feat_shape", None) is not None:
        return rope.get_embed()
    return rope.get_embed(shape=[grid_size, grid_size])


def quick_gelu(x: Float[Tensor, "*dims"]) -> Float[Tensor, "*dims"]:
    """OpenAI CLIP's QuickGELU, ``x * sigmoid(1.702 x)`` (timm's formula, so bit-identical)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_pytorch_tanh(x: Float[Tensor, "*dims"]) -> Float[Tensor, "*dims"]:
    """GELU with the tanh approximation (timm's ``gelu_tanh``, TransformerLens's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_pytorch_tanh": gelu_pytorch_tanh, "silu": F.silu,
}


class MLP(nn.Module):
    """fc1 -> activation (``cfg.act_fn``) -> fc2 -> the block's LayerScale (``layer_scale``, registered
    by the block), with pre- and post-activation hooks.

    Gated (``gated``, SwiGLU): ``hook_post = act(hook_pre) * hook_pre_linear`` with ``hook_pre = fc1_g x``
    and ``hook_pre_linear = fc1_x x`` (TransformerLens's gated-MLP hooks; timm's ``SwiGLU`` names).
    ``inner_norm`` (EVA-02's scale_mlp): a LayerNorm ``norm`` on ``hook_post`` before ``fc2``."""

    def __init__(self, cfg: HookedViTConfig, layer_scale: nn.Module, *, gated: bool = False, inner_norm: bool = False):
        super().__init__()
        self.__dict__["layer_scale"] = layer_scale  # not a submodule: the block owns it
        self.act = ACTIVATIONS[cfg.act_fn]
        self.gated = gated
        if gated:
            self.fc1_g = nn.Linear(cfg.d_model, cfg.d_mlp)
            self.fc1_x = nn.Linear(cfg.d_model, cfg.d_mlp)
        else:
            self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: fc1 output (the gate's, fc1_g, when gated)
        if gated:
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]: fc1_x output, the gated branch
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]: activation output, or the gated product (mlp_act)
        if inner_norm:
            self.norm = LayerNorm(cfg.d_mlp, cfg.ln_eps)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.gated:
            gate = self.hook_pre(self.fc1_g(x))
            post = self.hook_post(self.act(gate) * self.hook_pre_linear(self.fc1_x(x)))
        else:
            post = self.hook_post(self.act(self.hook_pre(self.fc1(x))))
        if hasattr(self, "norm"):
            post = self.norm(post)
        return self.layer_scale(self.fc2(post))

    @property
    def fc_in(self) -> nn.Linear:
        """The Linear whose output is multiplied into ``hook_post``: ``fc1`` (``fc1_x`` when gated)."""
        return self.fc1_x if self.gated else self.fc1

    # ---------------------------------------------------------------- TransformerLens weight views
    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.fc_in.weight.T

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        return self.fc_in.bias

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        """The gate's weight (``fc1_g``) of a gated MLP (TransformerLens's ``W_gate``)."""
        if not self.gated:
            raise AttributeError("W_gate exists only for a gated (SwiGLU) MLP")
        return self.fc1_g.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        """``fc2`` weight, LayerScale folded in: ``post @ W_out + b_out`` is ``hook_mlp_out`` (after the
        inner norm, if any)."""
        gamma = _layer_scale_gamma(self.layer_scale)
        return (self.fc2.weight if gamma is None else self.fc2.weight * gamma[:, None]).T

    @property
    def b_out(self) -> Float[Tensor, "d_model"]:
        gamma = _layer_scale_gamma(self.layer_scale)
        return self.fc2.bias if gamma is None else self.fc2.bias * gamma


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + ls1(attn(ln1(x)))`` then ``x + ls2(mlp(ln2(x)))`` (the LayerScales
    are applied inside ``attn`` and ``mlp``).

    TransformerLens's optional inputs (each off by default; its hooks are then left out of
    ``model.hook_dict``): ``use_attn_in`` hooks ``hook_attn_in``, the residual stream repeated per
    head ``[batch, pos, head, d_model]``; ``use_split_qkv_input`` hooks a separate copy of it per
    input, ``hook_q_input``/``hook_k_input``/``hook_v_input``; ``ln1`` then runs on each (its hooks
    gain the head axis) and head ``h``'s q/k/v read slice ``h``. ``use_hook_mlp_in`` hooks
    ``hook_mlp_in``, the residual stream entering ``ln2``.
    """

    def __init__(self, cfg: HookedViTConfig, rope: nn.Module | None = None):
        super().__init__()
        # Registered in execution order, so model.hook_dict lists hooks in the order they fire.
        # (and parameters in timm's order: ln1, attn, ls1, ln2, mlp, ls2).
        ls1, ls2 = (LayerScale(cfg.d_model) if cfg.layer_scale else nn.Identity() for _ in range(2))
        self.use_attn_in, self.use_split_qkv_input = cfg.use_attn_in, cfg.use_split_qkv_input
        self.use_hook_mlp_in = cfg.use_hook_mlp_in
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_in = HookPoint()  # [batch, pos, head, d_model] (use_attn_in)
        self.hook_q_input = HookPoint()  # [batch, pos, head, d_model] (use_split_qkv_input)
        self.hook_k_input = HookPoint()  # [batch, pos, head, d_model] (use_split_qkv_input)
        self.hook_v_input = HookPoint()  # [batch, pos, head, d_model] (use_split_qkv_input)
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg, ls1, rope)
        self.ls1 = ls1
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]: after LayerScale, before the add
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_in = HookPoint()  # [batch, pos, d_model] (use_hook_mlp_in)
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg, ls2, gated=cfg.gated_mlp, inner_norm=cfg.mlp_norm)
        self.ls2 = ls2
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]: after LayerScale, before the add
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_resid_pre(x)
        if self.use_attn_in or self.use_split_qkv_input:
            attn_out = self.attn(*self._per_head_inputs(x))
        else:
            attn_out = self.attn(self.ln1(x))
        x = self.hook_resid_mid(x + self.hook_attn_out(attn_out))
        mlp_in = x
        if self.use_hook_mlp_in:  # own memory when hooked: an in-place edit must not reach resid_mid
            mlp_in = self.hook_mlp_in(x.clone() if self.hook_mlp_in.has_hooks() else x)
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(mlp_in))))

    def _per_head_inputs(self, x: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, ...]:
        """The normalized per-head attention inputs: one tensor (use_attn_in), or q, k, v's."""
        # A broadcast view; copied (TL's repeat_along_head_dimension) only for a hook, which may edit it.
        attn_in = x[:, :, None].expand(-1, -1, self.attn.n_heads, -1)
        if self.use_attn_in:
            attn_in = self.hook_attn_in(attn_in.clone() if self.hook_attn_in.has_hooks() else attn_in)
        if not self.use_split_qkv_input:
            return (self.ln1(attn_in),)
        inputs = [hook(attn_in.clone() if hook.has_hooks() else attn_in)
                  for hook in (self.hook_q_input, self.hook_k_input, self.hook_v_input)]
        return tuple(self.ln1(inp) for inp in inputs)  # as TL: all three input hooks, then ln1 on each


class Unembed(nn.Linear):
    """The classifier head (timm's ``head``, reading the final-norm CLS token), with
    TransformerLens's ``unembed.W_U`` ``[d_model, n_classes]`` and ``unembed.b_U`` views."""

    @property
    def W_U(self) -> Float[Tensor, "d_model n_classes"]:
        return self.weight.T

    @property
    def b_U(self) -> Float[Tensor, "n_classes"]:
        return self.bias


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided conv, as timm's ``patch_embed.proj`` (without
    bias for CLIP, ``cfg.patch_bias``)."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)

    def forward(
        self, images: Float[Tensor, "batch channel height width"]
    ) -> Float[Tensor, "batch n_patches d_model"]:
        return self.proj(images).flatten(2).transpose(1, 2)


class AttentionPool(nn.Module):
    """timm's ``AttentionPoolLatent`` (SigLIP's ``global_pool='map'`` head), hooked: one learned latent
    query attends over the patch tokens (multi-head, keys and values from the fused ``kv``), ``proj``,
    then a residual MLP on its LayerNorm, ``out = attn_out + mlp(norm(attn_out))``; returns ``out``
    ``[batch, 1, d_model]`` (the model takes the latent, ``hook_pooled``). Parameter names are timm's
    (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp.fc1``/``fc2``). As in the blocks, attention runs
    through ``F.scaled_dot_product_attention`` unless the scores or pattern are hooked."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        d_model = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.scale = self.d_head**-0.5
        self.latent = nn.Parameter(torch.zeros(1, 1, d_model))
        self.hook_latent = HookPoint()  # [batch, latent, d_model]: the learned query input
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.hook_q = HookPoint()  # [batch, latent, head, d_head]
        self.hook_k = HookPoint()  # [batch, patch_pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, patch_pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, latent, patch_pos]
        self.hook_pattern = HookPoint()  # [batch, head, latent, patch_pos]
        self.hook_z = HookPoint()  # [batch, latent, head, d_head]
        self.proj = nn.Linear(d_model, d_model)
        self.hook_attn_out = HookPoint()  # [batch, latent, d_model]: proj output
        self.norm = LayerNorm(d_model, cfg.ln_eps)
        self.mlp = MLP(cfg, nn.Identity())
        self.hook_mlp_out = HookPoint()  # [batch, latent, d_model]

    def forward(self, x: Float[Tensor, "batch patch_pos d_model"]) -> Float[Tensor, "batch latent d_model"]:
        batch, pos = x.shape[:2]
        latent = self.latent.expand(batch, -1, -1)
        latent = self.hook_latent(latent.clone() if self.hook_latent.has_hooks() else latent)
        q = self.hook_q(self.q(latent).view(batch, 1, self.n_heads, self.d_head))
        kv = self.kv(x).view(batch, pos, 2, self.n_heads, self.d_head)
        k, v = self.hook_k(kv[:, :, 0]), self.hook_v(kv[:, :, 1])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # timm's layout
        z = attend(q, k, v, self.scale, self.hook_attn_scores, self.hook_pattern, self.hook_z)
        out = self.hook_attn_out(self.proj(z.reshape(batch, 1, self.n_heads * self.d_head)))
        return out + self.hook_mlp_out(self.mlp(self.norm(out)))
