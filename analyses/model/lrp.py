"""Model-level attribution maps for a hooked DeiT-III / ViT (IMPACT sec. 3.5, appendix 0.A.3).

Every method returns one relevance per patch, ``[batch, grid, grid]``, explaining the logit of
``target`` (default: each image's argmax):

* :func:`transformer_attribution` (``"chefer"``): Chefer et al. 2021, the semantics of their
  published ``ViT_LRP.py`` / ``layers_ours.py``. LRP alpha=1 beta=0 on every Linear (no bias);
  LayerNorm, GELU, softmax and dropout pass relevance; each residual add splits relevance in
  proportion to its operands and rescales both parts so that their absolute sums share the incoming
  total (per image); each attention matmul splits relevance between its operands and halves it;
  per block ``mean over heads of clamp(grad_A * R_A, min=0)``; rollout ``(I + A_L) ... (I +
  A_start)`` without row normalisation; the CLS row over the patch tokens.
* :func:`attn_lrp` (``"attnlrp"`` / ``"cp_lrp"``): Achtibat et al. 2024 as forward hooks plus
  autograd (gradient x input).
* :func:`attention_rollout` (Abnar & Zuidema 2020), :func:`gradient_x_input`, :func:`random_map`.

DeiT-III adaptation: LayerScale passes relevance unchanged (``layerscale_rule="identity"``,
equivalent to folding a positive ``gamma`` into ``proj``/``fc2``); the paper's eq. 14 divides the
relevance by ``gamma + eps`` (``"eq14"``, opt-in, not conservative). ``no_embed_class`` needs no
padding: the hooked model's token axis is always the prefix tokens (CLS, registers) then the patches.

Other readouts than the CLS token (:func:`readout_row`): the map is read from the row of whatever
the classifier reads, over the patch tokens (prefix tokens, registers included, dropped). Mean
pooling reads every patch token with weight ``1/N``; an attention-pool head (SigLIP's
``AttentionPoolLatent``) reads them through its pattern. Chefer: relevance enters the last block's
output through the pooling (the mean by the z-rule; the attention pool as a block: its residual MLP,
LayerNorm passing, ``proj``, the ``pattern @ v`` and ``q @ k.T`` matmuls split and halved, the
latent query's share dropped, ``kv``), and the pool's own map ``mean over heads of clamp(grad_A *
R_A, min=0)`` ``[1, N]`` replaces the CLS row: ``map = pool_row @ rollout`` (the latent has no
identity path: it is a constant); ``pool_row="pattern"`` uses the pool's head-averaged pattern
instead (no effect on a model with a class token or mean pooling). Attention rollout uses the
head-averaged pool pattern as the row. AttnLRP through the pool: its pattern a constant (all
relevance through the value path), its LayerNorm scale detached, epsilon-LRP at ``kv``, ``proj``,
``fc1``, ``fc2``, the identity rule at its GELU; every LayerNorm outside the blocks
(``ln_final``, ``fc_norm``, ``ln_pre``) has its scale detached.

The Chefer propagation is a pure function of the tensors cached by one forward (and one
``autograd.grad`` for the attention gradients) and of the weights: :func:`chefer_cache` then
:func:`chefer_propagate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from analyses.model.config import ATTRIBUTION_METHODS, LAYERSCALE_RULES, POOL_ROWS
from hooked_vit.components import rotary_table
from hooked_vit.errors import InvalidArgumentError

ATTN_LRP_VARIANTS: tuple[str, ...] = ("attnlrp", "cp_lrp")
MAP_LOCATIONS: tuple[str, ...] = ("tokens", "pixels")
LAYERSCALE_EPS = 1e-9  # eq. 14's epsilon (the paper gives no value)
REFERENCE_STABILISER = 1e-9  # the reference's safe_divide adds this to every denominator
CANCELLATION_LIMIT = 1e-2  # lrp_linear goes term by term where x+ w+ + x- w- < this * |x| |w|

Target = int | Sequence[int] | Int[Tensor, "batch"] | None


# ----------------------------------------------------------------------------- checks
def _fail(message: str) -> None:
    raise InvalidArgumentError(message)


def check_choice(value: str, choices: Sequence[str], what: str) -> None:
    """One-line error unless ``value`` is one of ``choices``."""
    if value not in choices:
        _fail(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_model_images(model: nn.Module, images: Float[Tensor, "batch channel height width"]) -> None:
    """The model's own image check (shape, dtype, device), before any work."""
    from hooked_vit.validation import check_images

    check_images(images, model.cfg, next(model.parameters()))


def resolve_target(target: Target, logits: Float[Tensor, "batch n_classes"]) -> Int[Tensor, "batch"]:
    """Per-image class to explain: ``target`` (an int for all, or one per image) else the argmax."""
    batch, n_classes = logits.shape
    if target is None:
        return logits.argmax(-1)
    out = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if out.numel() == 1:
        out = out.expand(batch)
    if out.numel() != batch:
        _fail(f"target has {out.numel()} entries for {batch} images; give one int or one per image")
    if (out < 0).any() or (out >= n_classes).any():
        bad = out[(out < 0) | (out >= n_classes)][0].item()
        _fail(f"target {bad} is outside the model's classes; valid targets are 0..{n_classes - 1}")
    return out.clone()


def check_target(model: nn.Module, target: Target, batch: int) -> None:
    """:func:`resolve_target`'s checks, run before the forward pass."""
    if target is not None:
        resolve_target(target, torch.zeros(batch, model.cfg.n_classes))


def check_start_layer(model: nn.Module, start_layer: int) -> None:
    n = model.cfg.n_layers
    if not 0 <= start_layer < n:
        _fail(f"start_layer {start_layer} is outside the model's blocks; choose 0..{n - 1}")


def _to_grid(model: nn.Module, per_patch: Float[Tensor, "batch n_patches"]) -> Float[Tensor, "batch grid grid"]:
    grid = model.cfg.grid_size
    return per_patch.reshape(per_patch.shape[0], grid, grid)


def _patches_to_grid(model: nn.Module, per_token: Float[Tensor, "batch pos"]) -> Float[Tensor, "batch grid grid"]:
    """The patch tokens of a per-position value (prefix tokens dropped) on the grid."""
    return _to_grid(model, per_token[:, model.cfg.n_prefix_tokens:])


def readout_row(model: nn.Module, joint: Float[Tensor, "batch pos pos"],
                pool_row: Float[Tensor, "batch n_patches"] | None = None) -> Float[Tensor, "batch grid grid"]:
    """The row of a rollout ``joint`` that the classifier reads, on the patch grid: the CLS row
    (token pooling), the mean of the patch rows (mean pooling), the mean of those two (``token_avg``: the
    head reads both, side by side), or ``pool_row @ joint`` over the patch rows (attention pool:
    ``pool_row`` its per-patch weights)."""
    cfg = model.cfg
    if cfg.pooling == "token":
        return _patches_to_grid(model, joint[:, 0])
    patch_rows = joint[:, cfg.n_prefix_tokens:]
    if cfg.pooling == "avg":
        return _patches_to_grid(model, patch_rows.mean(dim=1))
    if cfg.pooling == "token_avg":
        return _patches_to_grid(model, (joint[:, 0] + patch_rows.mean(dim=1)) / 2)
    if pool_row is None:
        _fail("an attention-pooled model's map needs the pool's row (its pattern or relevance map)")
    return _patches_to_grid(model, torch.einsum("bp,bpq->bq", pool_row.to(joint.dtype), patch_rows))


# ----------------------------------------------------------------------------- LRP rules
def safe_divide(a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """``a / (b + scale * 1e-9)`` where ``b != 0``, else 0: the reference's stabilised division
    (``scale`` for a ``b`` that is ``scale`` times the reference's denominator)."""
    denominator = (b + scale * REFERENCE_STABILISER).masked_fill_(b == 0, float("inf"))  # a / inf = 0
    return a / denominator


def lrp_linear_reference(x: Float[Tensor, "*batch d_in"], weight: Float[Tensor, "d_out d_in"],
                         relevance: Float[Tensor, "*batch d_out"]) -> Float[Tensor, "*batch d_in"]:
    """:func:`lrp_linear` as the reference computes it, term by term (four matmuls)."""
    px, nx = x.clamp(min=0), x.clamp(max=0)
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    s = safe_divide(relevance, px @ pw.T + nx @ nw.T)
    return px * (s @ pw) + nx * (s @ nw)


def lrp_linear(x: Float[Tensor, "*batch d_in"], weight: Float[Tensor, "d_out d_in"],
               relevance: Float[Tensor, "*batch d_out"],
               product: Float[Tensor, "*batch d_out"] | None = None) -> Float[Tensor, "*batch d_in"]:
    """LRP alpha=1 beta=0 through ``x @ weight.T`` (bias ignored): each output's relevance is shared
    among the inputs in proportion to their positive contributions ``x+ w+ + x- w-``.

    Per term ``x+ w+ + x- w- = (x w + |x| |w|) / 2``, so the sums take two matmuls and ``product``
    (``x @ weight.T``, e.g. the layer's cached output less its bias) saves one of them. Rows where
    an output's positive part is below :data:`CANCELLATION_LIMIT` of ``|x| |w|`` (nearly every
    contribution negative) would lose their digits to that difference: they are redone term by term
    (:func:`lrp_linear_reference`)."""
    abs_x, abs_w = x.abs(), weight.abs()
    if product is None:
        product = x @ weight.T
    magnitude = abs_x @ abs_w.T
    twice_positive = (product + magnitude).clamp_(min=0)  # 2 (x+ w+ + x- w-)
    s = safe_divide(relevance, twice_positive, scale=2.0)  # half of R / (x+ w+ + x- w- + 1e-9)
    out = x * (s @ weight) + abs_x * (s @ abs_w)
    d_in, d_out = weight.shape[1], weight.shape[0]
    ill = (twice_positive < 2 * CANCELLATION_LIMIT * magnitude).reshape(-1, d_out).any(-1)
    if ill.any():  # rows are independent: redo only these
        out.view(-1, d_in)[ill] = lrp_linear_reference(x.reshape(-1, d_in)[ill], weight,
                                                       relevance.reshape(-1, d_out)[ill])
    return out


def lrp_add(x0: Float[Tensor, "batch pos d"], x1: Float[Tensor, "batch pos d"],
            relevance: Float[Tensor, "batch pos d"]) -> tuple[Tensor, Tensor]:
    """Relevance of ``x0 + x1``: the z-rule split, then each part rescaled so that its sum is its
    share ``|sum_a| / (|sum_a| + |sum_b|)`` of the incoming total (sums per image)."""
    s = safe_divide(relevance, x0 + x1)
    a, b = x0 * s, x1 * s
    a_sum, b_sum, total = a.sum((1, 2)), b.sum((1, 2)), relevance.sum((1, 2))
    denominator = a_sum.abs() + b_sum.abs()
    a_share = safe_divide(a_sum.abs(), denominator) * total
    b_share = safe_divide(b_sum.abs(), denominator) * total
    return a * safe_divide(a_share, a_sum)[:, None, None], b * safe_divide(b_share, b_sum)[:, None, None]


def lrp_clone(x: Float[Tensor, "batch pos d"], r0: Float[Tensor, "batch pos d"],
              r1: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
    """Relevance of a tensor used twice: the two relevances summed (through the z-rule, as the reference)."""
    return x * (safe_divide(r0, x) + safe_divide(r1, x))


def lrp_matmul(a: Float[Tensor, "*batch i j"], b: Float[Tensor, "*batch j k"],
               relevance: Float[Tensor, "*batch i k"]) -> tuple[Tensor, Tensor]:
    """z-rule through ``a @ b`` to both operands (each receives the full relevance, not yet halved)."""
    s = safe_divide(relevance, a @ b)
    return a * (s @ b.transpose(-1, -2)), b * (a.transpose(-1, -2) @ s)


# ----------------------------------------------------------------------------- Chefer: cache
def _block_names(model: nn.Module, layer: int) -> dict[str, str]:
    """The hooks of block ``layer`` the propagation reads; with an Eva's parts also ``rot_q``/``rot_k``
    (RoPE), ``z_norm`` (the norm on z, proj's input), ``mlp_linear`` (a gated MLP's ``fc1_x`` output)
    and ``mlp_hidden`` (the MLP's inner norm output, fc2's input)."""
    p, cfg = f"blocks.{layer}.", model.cfg
    names = {"resid_pre": p + "hook_resid_pre", "ln1": p + "ln1.hook_normalized", "q": p + "attn.hook_q",
             "k": p + "attn.hook_k", "v": p + "attn.hook_v", "pattern": p + "attn.hook_pattern",
             "z": p + "attn.hook_z", "attn_out": p + "hook_attn_out", "ln2": p + "ln2.hook_normalized",
             "mlp_pre": p + "mlp.hook_pre", "mlp_post": p + "mlp.hook_post", "mlp_out": p + "hook_mlp_out"}
    optional = {"rot_q": ("rope", "attn.hook_rot_q"), "rot_k": ("rope", "attn.hook_rot_k"),
                "z_norm": ("attn_norm", "attn.norm.hook_normalized"), "mlp_linear": ("gated_mlp", "mlp.hook_pre_linear"),
                "mlp_hidden": ("mlp_norm", "mlp.norm.hook_normalized")}
    names.update({key: p + name for key, (field_name, name) in optional.items() if getattr(cfg, field_name)})
    return names


def _pooled_tokens_name(model: nn.Module) -> str:
    """The hook of the tokens a mean or attention pool reads: the final-norm tokens, or the last
    block's output when the final norm is ``fc_norm`` (after pooling)."""
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" if model.cfg.fc_norm else "ln_final.hook_normalized"


def _head_names(model: nn.Module) -> dict[str, str]:
    """The pooling's hooks the Chefer propagation reads: none for the CLS token; the pooled tokens
    for mean pooling; those and the attention-pool head's activations for an attention pool."""
    if model.cfg.pooling == "token":
        return {}
    names = {"tokens": _pooled_tokens_name(model)}  # token_avg: the CLS half read from them too
    if model.cfg.pooling == "map":
        p = "attn_pool."
        names.update({"q": p + "hook_q", "k": p + "hook_k", "v": p + "hook_v", "pattern": p + "hook_pattern",
                      "z": p + "hook_z", "attn_out": p + "hook_attn_out", "norm": p + "norm.hook_normalized",
                      "mlp_pre": p + "mlp.hook_pre", "mlp_post": p + "mlp.hook_post", "mlp_out": p + "hook_mlp_out"})
    return names


@dataclass
class CheferCache:
    """What the Chefer propagation reads, from one forward (and the attention gradients).

    ``blocks[l]`` maps ``resid_pre, ln1, q, k, v, pattern, z, attn_out, ln2, mlp_pre, mlp_post, mlp_out`` to
    block ``l``'s activations (q/k/v/z ``[batch pos head d_head]``, pattern ``[batch head pos pos]``,
    the rest ``[batch pos d]``) for ``l >= start_layer``; ``pattern_grads[l]`` is the gradient of
    the target logit with respect to block ``l``'s pattern; ``pooled`` the head's input. ``head``:
    the pooling's activations (empty for CLS pooling; ``tokens`` ``[batch pos d]`` for mean pooling;
    with an attention pool also its ``q, k, v, pattern, z, attn_out, norm, mlp_pre, mlp_post,
    mlp_out``, the latent as one query position), ``head_pattern_grad`` the target logit's gradient
    with respect to the pool's pattern ``[batch head 1 n_patches]`` (``None`` without one).
    """

    logits: Tensor
    target: Tensor
    pooled: Tensor
    blocks: dict[int, dict[str, Tensor]]
    pattern_grads: dict[int, Tensor]
    start_layer: int
    head: dict[str, Tensor] = field(default_factory=dict)
    head_pattern_grad: Tensor | None = None


def chefer_cache(model: nn.Module, images: Float[Tensor, "batch channel height width"], target: Target = None,
                 start_layer: int = 0) -> CheferCache:
    """One forward with caching hooks on blocks ``start_layer..`` (the explicit attention path runs
    because ``hook_pattern`` is hooked), then ``autograd.grad`` of the summed target logits with
    respect to the cached patterns (images do not interact, so each image gets its own gradient)."""
    layers = range(start_layer, model.cfg.n_layers)
    names = {name: (layer, key) for layer in layers for key, name in _block_names(model, layer).items()}
    head_keys = {name: key for key, name in _head_names(model).items()}
    store: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
    head: dict[str, Tensor] = {}
    pooled: list[Tensor] = []

    def keep(act: Tensor, hook) -> None:
        if hook.name in names:
            layer, key = names[hook.name]
            store[layer][key] = act
        if hook.name in head_keys:
            head[head_keys[hook.name]] = act

    hooks = [(name, keep) for name in {**names, **head_keys}] + [
        ("hook_pooled", lambda act, hook: pooled.append(act))]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(images)
        chosen = resolve_target(target, logits.detach())
        score = logits.gather(1, chosen[:, None]).sum()
        patterns = [store[layer]["pattern"] for layer in layers] + ([head["pattern"]] if "pattern" in head else [])
        grads = torch.autograd.grad(score, patterns)
    detached = {layer: {k: v.detach() for k, v in acts.items()} for layer, acts in store.items()}
    return CheferCache(logits.detach(), chosen, pooled[0].detach(), detached,
                       {layer: g.detach() for layer, g in zip(layers, grads)}, start_layer,
                       {k: v.detach() for k, v in head.items()},
                       grads[-1].detach() if "pattern" in head else None)


# ----------------------------------------------------------------------------- Chefer: propagation
@dataclass
class CheferRelevance:
    """The Chefer propagation's output: per block ``l >= start_layer`` the relevance of the attention
    pattern ``attention[l]`` ``[batch head pos pos]`` (after the reference's halving) and of the
    block's input ``resid_pre[l]`` ``[batch pos d_model]``; ``maps[l]`` the per-block map
    ``mean over heads of clamp(grad_A * R_A, min=0)`` ``[batch pos pos]``; ``pool_map`` the
    attention pool's map, the same over its pattern, ``[batch n_patches]`` (``None`` without one)."""

    attention: dict[int, Tensor]
    resid_pre: dict[int, Tensor]
    maps: dict[int, Tensor]
    pool_map: Tensor | None = None


def _layerscale(relevance: Tensor, ls: nn.Module, rule: str, dtype: torch.dtype) -> Tensor:
    if rule == "identity" or not hasattr(ls, "gamma"):
        return relevance
    return relevance / (ls.gamma.detach().to(dtype) + LAYERSCALE_EPS)


def _linear_product(output: Tensor, linear: nn.Linear, ls: nn.Module | None, reuse: bool) -> Tensor | None:
    """``x @ W.T`` of ``linear`` recovered from its cached ``output`` (taken after ``ls`` when that
    is a LayerScale), saving :func:`lrp_linear` a matmul; ``None`` (recompute it) unless ``reuse``
    (the cache is in the propagation's dtype) or when a LayerScale has a zero ``gamma``."""
    if not reuse:
        return None
    if ls is not None and hasattr(ls, "gamma"):
        gamma = ls.gamma.detach().to(output.dtype)
        if not bool((gamma != 0).all()):
            return None
        output = output / gamma
    return output if linear.bias is None else output - linear.bias.detach().to(output.dtype)


def _attention_relevance(block: nn.Module, acts: dict[str, Tensor], relevance: Tensor, dtype: torch.dtype,
                         cp_attention: bool, reuse: bool) -> tuple[Tensor, Tensor]:
    """Through ``proj``, the two attention matmuls and ``qkv``: (relevance of the pattern
    ``[batch head q k]``, relevance of ``ln1``'s output ``[batch pos d_model]``)."""
    attn = block.attn
    batch, pos, heads, d_head = acts["z"].shape
    proj_in = acts.get("z_norm", acts["z"].reshape(batch, pos, -1))  # an inner LayerNorm on z passes relevance
    r_z = lrp_linear(proj_in, attn.proj.weight.detach().to(dtype), relevance,
                     _linear_product(acts["attn_out"], attn.proj, block.ls1, reuse))
    r_z = r_z.reshape(batch, pos, heads, d_head).transpose(1, 2)  # [batch head pos d_head]
    q, k, v = (acts[n].transpose(1, 2) for n in ("q", "k", "v"))  # [batch head pos d_head]
    r_pattern, r_v = lrp_matmul(acts["pattern"], v, r_z)
    r_pattern = r_pattern / 2
    if cp_attention:  # the pattern is a constant: all of the matmul's relevance goes to V
        r_q, r_k = torch.zeros_like(q), torch.zeros_like(k)
    else:
        r_v = r_v / 2
        if "rot_q" in acts:  # RoPE: the scores read the rotated q and k
            rot_q, rot_k = acts["rot_q"].transpose(1, 2), acts["rot_k"].transpose(1, 2)
            r_q, r_k_t = lrp_matmul(rot_q, rot_k.transpose(-1, -2), r_pattern)  # softmax passes relevance
            r_q = _rotary_relevance(attn, q, rot_q, r_q)
            r_k_t = _rotary_relevance(attn, k, rot_k, r_k_t.transpose(-1, -2)).transpose(-1, -2)
        else:
            r_q, r_k_t = lrp_matmul(q, k.transpose(-1, -2), r_pattern)  # softmax passes relevance
        r_q, r_k = r_q / 2, r_k_t.transpose(-1, -2) / 2
    r_qkv = torch.stack([r_q, r_k, r_v], dim=2).transpose(1, 3).reshape(batch, pos, 3 * heads * d_head)
    product = None
    if reuse:  # qkv's output, laid out as the Linear writes it
        qkv = torch.stack([acts["q"], acts["k"], acts["v"]], dim=2).reshape(batch, pos, 3 * heads * d_head)
        product = _linear_product(qkv, attn.qkv, None, reuse)
    return r_pattern, lrp_linear(acts["ln1"], attn.qkv.weight.detach().to(dtype), r_qkv, product)


def _rotary_relevance(attn: nn.Module, x: Float[Tensor, "batch head pos d_head"],
                      rotated: Float[Tensor, "batch head pos d_head"],
                      relevance: Float[Tensor, "batch head pos d_head"]) -> Float[Tensor, "batch head pos d_head"]:
    """Relevance of q (or k) from that of its rotation ``x * cos + rot(x) * sin`` (timm's rotary
    embedding, linear and without bias) by the z-rule: each output feature's relevance is shared by
    its two inputs (the feature and its rotation partner) in proportion to their terms; the prefix
    tokens are not rotated and pass relevance."""
    from timm.layers.pos_embed_sincos import rope_rotate_half, rot

    n = attn.n_prefix_tokens
    table = rotary_table(attn.rope, attn.grid_size).to(x)
    sin, cos = table.chunk(2, dim=-1)  # [n_patches, d_head]
    half = attn.rope.rotate_half
    patches, s = x[:, :, n:], safe_divide(relevance[:, :, n:], rotated[:, :, n:])
    own = patches * cos * s
    partner_term = (rope_rotate_half(patches) if half else rot(patches)) * sin * s  # term of the partner feature
    if half:  # the partner of feature i is i +- d_head / 2
        back = partner_term.roll(partner_term.shape[-1] // 2, dims=-1)
    else:  # the partner of feature 2j is 2j + 1 and vice versa
        back = partner_term.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.cat([relevance[:, :, :n], own + back], dim=2)


def _pool_relevance(model: nn.Module, cache: CheferCache, r_pooled: Float[Tensor, "batch d_model"],
                    dtype: torch.dtype, cp_attention: bool, reuse: bool) -> tuple[Tensor, Tensor]:
    """Through the attention-pool head (``pooled = a + mlp(norm(a))``, ``a = proj(pattern @ v)``),
    as through a block: (relevance of the pool's input tokens ``[batch n_patches d_model]``,
    relevance of its pattern ``[batch head 1 n_patches]`` after the halving). The latent query's
    share of ``q @ k.T`` is dropped (a constant, not the image's)."""
    pool, acts = model.attn_pool, {k: v.to(dtype) for k, v in cache.head.items()}
    r_attn, r_mlp = lrp_add(acts["attn_out"], acts["mlp_out"], r_pooled[:, None])
    mlp = pool.mlp
    r_hidden = lrp_linear(acts["mlp_post"], mlp.fc2.weight.detach().to(dtype), r_mlp,  # GELU passes
                          _linear_product(acts["mlp_out"], mlp.fc2, None, reuse))
    r_norm = lrp_linear(acts["norm"], mlp.fc1.weight.detach().to(dtype), r_hidden,  # LayerNorm passes
                        _linear_product(acts["mlp_pre"], mlp.fc1, None, reuse))
    r_attn = lrp_clone(acts["attn_out"], r_attn, r_norm)
    batch, _, heads, d_head = acts["z"].shape
    r_z = lrp_linear(acts["z"].reshape(batch, 1, -1), pool.proj.weight.detach().to(dtype), r_attn,
                     _linear_product(acts["attn_out"], pool.proj, None, reuse))
    r_z = r_z.reshape(batch, 1, heads, d_head).transpose(1, 2)  # [batch head 1 d_head]
    q, k, v = (acts[n].transpose(1, 2) for n in ("q", "k", "v"))  # [batch head pos d_head]
    r_pattern, r_v = lrp_matmul(acts["pattern"], v, r_z)
    r_pattern = r_pattern / 2
    if cp_attention:
        r_k = torch.zeros_like(k)
    else:
        r_v = r_v / 2
        _, r_k_t = lrp_matmul(q, k.transpose(-1, -2), r_pattern)  # softmax passes; the latent's half dropped
        r_k = r_k_t.transpose(-1, -2) / 2
    n_patches = k.shape[2]
    r_kv = torch.stack([r_k, r_v], dim=2).transpose(1, 3).reshape(batch, n_patches, 2 * heads * d_head)
    product = None
    if reuse:  # kv's output, laid out as the Linear writes it
        kv = torch.stack([acts["k"], acts["v"]], dim=2).reshape(batch, n_patches, 2 * heads * d_head)
        product = _linear_product(kv, pool.kv, None, reuse)
    tokens = acts["tokens"][:, model.cfg.n_prefix_tokens:]
    return lrp_linear(tokens, pool.kv.weight.detach().to(dtype), r_kv, product), r_pattern


def _mlp_relevance(block: nn.Module, acts: dict[str, Tensor], relevance: Tensor, dtype: torch.dtype,
                   reuse: bool) -> Tensor:
    """Through ``fc2`` (its input the inner norm's output when there is one; that LayerNorm and the
    activation pass relevance) and ``fc1``; a gated MLP's ``act(gate) * linear`` splits relevance
    between its operands and halves it (as the attention matmuls), then ``fc1_g`` and ``fc1_x``:
    the relevance of ``ln2``'s output ``[batch pos d_model]``."""
    mlp = block.mlp
    r_hidden = lrp_linear(acts.get("mlp_hidden", acts["mlp_post"]), mlp.fc2.weight.detach().to(dtype), relevance,
                          _linear_product(acts["mlp_out"], mlp.fc2, block.ls2, reuse))
    if not mlp.gated:
        return lrp_linear(acts["ln2"], mlp.fc1.weight.detach().to(dtype), r_hidden,
                          _linear_product(acts["mlp_pre"], mlp.fc1, None, reuse))
    r_half = r_hidden * (acts["mlp_post"] != 0) / 2  # the z-rule through a product: each operand the whole, halved
    r_gate = lrp_linear(acts["ln2"], mlp.fc1_g.weight.detach().to(dtype), r_half,
                        _linear_product(acts["mlp_pre"], mlp.fc1_g, None, reuse))
    r_linear = lrp_linear(acts["ln2"], mlp.fc1_x.weight.detach().to(dtype), r_half,
                          _linear_product(acts["mlp_linear"], mlp.fc1_x, None, reuse))
    return r_gate + r_linear


def chefer_propagate(model: nn.Module, cache: CheferCache, *, layerscale_rule: str = "identity",
                     cp_attention: bool = False, dtype: torch.dtype | None = None) -> CheferRelevance:
    """The relevance propagation of Chefer et al., a pure function of ``cache`` and the weights,
    in ``dtype`` (default the cache's)."""
    check_choice(layerscale_rule, LAYERSCALE_RULES, "layerscale_rule")
    dtype = dtype or cache.pooled.dtype
    seed = F.one_hot(cache.target, cache.logits.shape[1]).to(dtype)  # [batch n_classes]
    pooled = cache.pooled.to(dtype)
    r_pooled = lrp_linear(pooled, model.head.weight.detach().to(dtype), seed)
    first = cache.blocks[model.cfg.n_layers - 1]["resid_pre"]
    relevance = torch.zeros(first.shape, dtype=dtype, device=first.device)
    reuse = cache.pooled.dtype == dtype  # the cached Linear outputs are exact in this dtype
    out = CheferRelevance({}, {}, {})
    n_prefix = model.cfg.n_prefix_tokens
    if model.cfg.pooling == "token":  # the final LayerNorm passes
        relevance[:, 0] = pooled * safe_divide(r_pooled, pooled)
    elif model.cfg.pooling == "avg":  # the z-rule through the mean; the final LayerNorm passes
        tokens = cache.head["tokens"][:, n_prefix:].to(dtype)
        relevance[:, n_prefix:] = tokens / tokens.shape[1] * safe_divide(r_pooled, tokens.mean(dim=1))[:, None]
    elif model.cfg.pooling == "token_avg":  # the CLS half as token pooling, the mean half as mean pooling
        d_model, tokens = model.cfg.d_model, cache.head["tokens"].to(dtype)
        cls, patches = tokens[:, 0], tokens[:, n_prefix:]
        relevance[:, 0] = cls * safe_divide(r_pooled[:, :d_model], cls)
        relevance[:, n_prefix:] = patches / patches.shape[1] * safe_divide(r_pooled[:, d_model:],
                                                                             patches.mean(dim=1))[:, None]
    else:
        r_tokens, r_pattern = _pool_relevance(model, cache, r_pooled, dtype, cp_attention, reuse)
        relevance[:, n_prefix:] = r_tokens  # the final LayerNorm passes
        grad = cache.head_pattern_grad.to(dtype)
        out.pool_map = (grad * r_pattern).clamp(min=0).mean(dim=1)[:, 0]
    for layer in range(model.cfg.n_layers - 1, cache.start_layer - 1, -1):
        block, acts = model.blocks[layer], {k: v.to(dtype) for k, v in cache.blocks[layer].items()}
        resid_mid = acts["resid_pre"] + acts["attn_out"]
        r_resid, r_mlp = lrp_add(resid_mid, acts["mlp_out"], relevance)
        r_mlp = _layerscale(r_mlp, block.ls2, layerscale_rule, dtype)
        r_ln2 = _mlp_relevance(block, acts, r_mlp, dtype, reuse)
        relevance = lrp_clone(resid_mid, r_resid, r_ln2)
        r_resid, r_attn = lrp_add(acts["resid_pre"], acts["attn_out"], relevance)
        r_attn = _layerscale(r_attn, block.ls1, layerscale_rule, dtype)
        r_pattern, r_ln1 = _attention_relevance(block, acts, r_attn, dtype, cp_attention, reuse)
        relevance = lrp_clone(acts["resid_pre"], r_resid, r_ln1)
        grad = cache.pattern_grads[layer].to(dtype)
        out.attention[layer], out.resid_pre[layer] = r_pattern, relevance
        out.maps[layer] = (grad * r_pattern).clamp(min=0).mean(dim=1)
    return out


def chefer_rollout(maps: Sequence[Float[Tensor, "batch pos pos"]]) -> Float[Tensor, "batch pos pos"]:
    """``(I + M_last) ... (I + M_first)`` without row normalisation (``maps`` first to last)."""
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    joint = maps[0] + eye
    for m in maps[1:]:
        joint = (m + eye) @ joint
    return joint


def transformer_attribution(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    target: Target = None,
    start_layer: int = 0,
    *,
    layerscale_rule: str = "identity",
    cp_attention: bool = False,
    pool_row: str = "chefer",
    dtype: torch.dtype | None = None,
) -> Float[Tensor, "batch grid grid"]:
    """Chefer et al.'s transformer attribution of ``target`` (default argmax) per patch.

    ``start_layer``: first block of the rollout (the reference's default 0; its ImageNet scripts
    use 1). ``layerscale_rule``: ``"identity"`` (default) or ``"eq14"`` (the paper's ``R /
    (gamma + eps)``, not conservative). ``cp_attention``: relevance of the attention output goes
    only through V. ``pool_row`` (attention-pool models only): the row read from the rollout,
    ``"chefer"`` (default) the pool's own map ``mean over heads of clamp(grad_A * R_A, min=0)``,
    ``"pattern"`` its head-averaged pattern. ``dtype``: propagation precision (e.g.
    ``torch.float64``; default the model's).
    """
    check_model_images(model, images)
    check_choice(layerscale_rule, LAYERSCALE_RULES, "layerscale_rule")
    check_choice(pool_row, POOL_ROWS, "pool_row")
    check_start_layer(model, start_layer)
    check_target(model, target, images.shape[0])
    cache = chefer_cache(model, images, target, start_layer)
    relevance = chefer_propagate(model, cache, layerscale_rule=layerscale_rule, cp_attention=cp_attention,
                                 dtype=dtype)
    joint = chefer_rollout([relevance.maps[layer] for layer in range(start_layer, model.cfg.n_layers)])
    row = relevance.pool_map
    if model.cfg.pooling == "map" and pool_row == "pattern":
        row = cache.head["pattern"].mean(dim=1)[:, 0]  # [batch n_patches]
    return readout_row(model, joint, row)


# ----------------------------------------------------------------------------- AttnLRP / CP-LRP
def _with_grad_factor(x: Tensor, factor: Tensor | float) -> Tensor:
    """``x`` in the forward pass, its gradient multiplied by ``factor`` in the backward pass."""
    frozen = x.detach()
    return frozen + (x - frozen) * factor


def _epsilon_factor(z: Tensor, epsilon: float | Tensor) -> Tensor:
    """``z / (z + eps * sign(z))``: the epsilon rule's damping of a Linear output's gradient."""
    z = z.detach()
    denominator = z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return torch.where(denominator != 0, z / denominator, torch.ones_like(z))


def attn_lrp_hooks(model: nn.Module, variant: str = "attnlrp", epsilon: float = 1e-6) -> list[tuple[str, Callable]]:
    """Forward hooks turning the model's gradient into AttnLRP (or CP-LRP) relevance / input:
    LayerNorm scales detached (the inner norms of EVA-02 too); the identity rule at GELU (SiLU);
    epsilon-LRP at every Linear output (``qkv``, ``proj``, ``fc1`` (``fc1_g``, ``fc1_x``), ``fc2``:
    through LayerScale with ``eps * |gamma|``); a gated MLP's ``act(gate) * linear`` by the uniform rule
    (half to each operand, AttnLRP's rule for gated products); the uniform rule
    (gradient halved to both operands) on ``q @ k.T`` and ``pattern @ v`` (``"attnlrp"``) or a
    detached pattern (``"cp_lrp"``); a rotary embedding is linear in q and k and passes the gradient. Softmax keeps its gradient (AttnLRP's softmax rule). Outside the
    blocks: every LayerNorm scale detached; an attention-pool head with its pattern detached (the
    value path linear), epsilon-LRP at ``kv``, ``proj``, ``fc1``, ``fc2`` and the identity rule at
    its GELU."""
    check_choice(variant, ATTN_LRP_VARIANTS, "variant")
    hooks: list[tuple[str, Callable]] = []
    pre: dict[int | str, Tensor] = {}

    def detach(act: Tensor, hook) -> Tensor:
        return act.detach()

    def epsilon_rule(act: Tensor, hook) -> Tensor:
        return _with_grad_factor(act, _epsilon_factor(act, epsilon))

    def half(act: Tensor, hook) -> Tensor:  # the uniform rule: each operand of a bilinear product gets half
        return _with_grad_factor(act, 0.5)

    def epsilon_half(act: Tensor, hook) -> Tensor:
        return half(epsilon_rule(act, hook), hook)

    def scaled_epsilon(act: Tensor, hook, ls: nn.Module) -> Tensor:  # a Linear output seen after LayerScale
        gamma = ls.gamma.detach().abs() if hasattr(ls, "gamma") else 1.0
        return _with_grad_factor(act, _epsilon_factor(act, epsilon * gamma))

    gated = getattr(model.cfg, "gated_mlp", False)  # a SwiGLU MLP (EVA-02)
    inner_norms = [part for part, flag in (("attn", "attn_norm"), ("mlp", "mlp_norm")) if getattr(model.cfg, flag, False)]
    block_act = model.blocks[0].mlp.act if gated else None
    for layer, block in enumerate(model.blocks):
        p = f"blocks.{layer}."

        def keep_pre(act: Tensor, hook, layer=layer) -> Tensor:
            pre[layer] = act = epsilon_rule(act, hook)
            return act

        def identity_rule(act: Tensor, hook, layer=layer) -> Tensor:
            x = pre[layer]
            return x * safe_ratio(act.detach(), x.detach())

        def keep_pre_linear(act: Tensor, hook, layer=layer) -> Tensor:
            pre[f"linear{layer}"] = act = epsilon_rule(act, hook)
            return act

        def gated_rule(act: Tensor, hook, layer=layer) -> Tensor:  # act(gate) * linear
            gate, linear = pre[layer], pre[f"linear{layer}"]
            activated = gate * safe_ratio(block_act(gate.detach()), gate.detach())  # the identity rule at the gate
            product = activated * linear
            return act.detach() + (product - product.detach()) * 0.5  # the uniform rule: half to each operand

        hooks += [(p + "ln1.hook_scale", detach), (p + "ln2.hook_scale", detach),
                  (p + "mlp.hook_pre", keep_pre),
                  (p + "mlp.hook_post", gated_rule if gated else identity_rule),
                  (p + "hook_attn_out", lambda a, hook, ls=block.ls1: scaled_epsilon(a, hook, ls)),
                  (p + "hook_mlp_out", lambda a, hook, ls=block.ls2: scaled_epsilon(a, hook, ls))]
        if gated:
            hooks.append((p + "mlp.hook_pre_linear", keep_pre_linear))
        hooks += [(p + f"{part}.norm.hook_scale", detach) for part in inner_norms]  # EVA-02's inner LayerNorms
        if variant == "attnlrp":
            hooks += [(p + f"attn.hook_{n}", epsilon_half) for n in "qkv"] + [(p + "attn.hook_pattern", half)]
        else:
            hooks += [(p + "attn.hook_pattern", detach)] + [(p + f"attn.hook_{n}", epsilon_rule) for n in "qkv"]
    hooks += [(name, detach) for name in model.hook_dict  # ln_final / fc_norm, ln_pre, the pool's norm
              if name.endswith(".hook_scale") and not name.startswith("blocks.")]
    if model.cfg.pooling == "map":  # the attention pool: its pattern a constant, value path linear
        p = "attn_pool."

        def keep_pool_pre(act: Tensor, hook) -> Tensor:
            pre["pool"] = act = epsilon_rule(act, hook)
            return act

        def pool_identity_rule(act: Tensor, hook) -> Tensor:
            x = pre["pool"]
            return x * safe_ratio(act.detach(), x.detach())

        hooks += [(p + "hook_pattern", detach), (p + "hook_k", epsilon_rule), (p + "hook_v", epsilon_rule),
                  (p + "hook_attn_out", epsilon_rule), (p + "hook_mlp_out", epsilon_rule),
                  (p + "mlp.hook_pre", keep_pool_pre), (p + "mlp.hook_post", pool_identity_rule)]
    return hooks


def safe_ratio(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` where ``b != 0``, else 0."""
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _gradient_x_input(model: nn.Module, images: Tensor, target: Target, hooks: list[tuple[str, Callable]],
                      at: str, epsilon: float) -> Tensor:
    """``input * d(target logit)/d(input)`` under ``hooks``, at block 0's input tokens (summed over
    d_model, patch tokens on the grid) or at the pixels (summed over channels)."""
    check_choice(at, MAP_LOCATIONS, "map location")
    check_model_images(model, images)
    check_target(model, target, images.shape[0])
    tokens: list[Tensor] = []
    pixels = images.detach().clone().requires_grad_(at == "pixels")
    hooks = hooks + [("hook_full_embed", lambda act, hook: tokens.append(act))]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(pixels)
        chosen = resolve_target(target, logits.detach())
        picked = logits.gather(1, chosen[:, None])
        score = _with_grad_factor(picked, _epsilon_factor(picked, epsilon)).sum()
        x = pixels if at == "pixels" else tokens[0]
        (grad,) = torch.autograd.grad(score, x)
    relevance = (x.detach() * grad)
    if at == "pixels":
        return relevance.sum(1)
    return _patches_to_grid(model, relevance.sum(-1))


def attn_lrp(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    target: Target = None,
    variant: str = "attnlrp",
    *,
    at: str = "tokens",
    epsilon: float = 1e-6,
) -> Float[Tensor, "batch grid grid"] | Float[Tensor, "batch height width"]:
    """AttnLRP (``"attnlrp"``) or CP-LRP (``"cp_lrp"``) relevance of ``target`` (default argmax):
    gradient x input under :func:`attn_lrp_hooks`, summed over d_model at the patch tokens of block
    0's input (``at="tokens"``, ``[batch grid grid]``) or over channels at the pixels
    (``at="pixels"``, ``[batch height width]``). ``epsilon``: the epsilon rule's stabiliser."""
    hooks = attn_lrp_hooks(model, variant, epsilon)
    return _gradient_x_input(model, images, target, hooks, at, epsilon)


# ----------------------------------------------------------------------------- baselines
def gradient_x_input(model: nn.Module, images: Float[Tensor, "batch channel height width"],
                     target: Target = None) -> Float[Tensor, "batch grid grid"]:
    """Plain gradient x input of the target logit at the pixels, summed over channels and over the
    pixels of each patch."""
    pixels = _gradient_x_input(model, images, target, [], "pixels", 0.0)
    p = model.cfg.patch_size
    return F.avg_pool2d(pixels[:, None], p)[:, 0] * p * p


@torch.no_grad()
def attention_rollout(model: nn.Module, images: Float[Tensor, "batch channel height width"],
                      target: Target = None, start_layer: int = 0) -> Float[Tensor, "batch grid grid"]:
    """Abnar & Zuidema's attention rollout: per block the head-averaged pattern as ``0.5 A + 0.5 I``
    (row-normalised), multiplied from ``start_layer`` to the last block; the readout's row
    (:func:`readout_row`: CLS, or the head-averaged attention-pool pattern) over patches.
    Class-agnostic: ``target`` is checked and ignored."""
    check_model_images(model, images)
    check_target(model, target, images.shape[0])
    check_start_layer(model, start_layer)
    patterns: list[Tensor] = []
    pool: list[Tensor] = []
    hooks = [(f"blocks.{layer}.attn.hook_pattern", lambda act, hook: patterns.append(act.mean(1)))
             for layer in range(start_layer, model.cfg.n_layers)]
    if model.cfg.pooling == "map":
        hooks.append(("attn_pool.hook_pattern", lambda act, hook: pool.append(act.mean(1)[:, 0])))
    model.run_with_hooks(images, fwd_hooks=hooks)
    eye = torch.eye(patterns[0].shape[-1], dtype=patterns[0].dtype, device=patterns[0].device)
    joint = None
    for pattern in patterns:
        step = 0.5 * pattern + 0.5 * eye
        step = step / step.sum(-1, keepdim=True)
        joint = step if joint is None else step @ joint
    return readout_row(model, joint, pool[0] if pool else None)


def random_map(model: nn.Module, images: Float[Tensor, "batch channel height width"], target: Target = None,
               seed: int = 0) -> Float[Tensor, "batch grid grid"]:
    """Uniform noise per patch from a generator seeded with ``seed`` (the baseline any map must beat)."""
    check_model_images(model, images)
    check_target(model, target, images.shape[0])
    grid = model.cfg.grid_size
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(images.shape[0], grid, grid, generator=generator).to(device=images.device,
                                                                          dtype=images.dtype)


# ----------------------------------------------------------------------------- registry
METHODS: dict[str, Callable[..., Tensor]] = {
    "chefer": transformer_attribution,
    "attnlrp": lambda model, images, target=None, **kw: attn_lrp(model, images, target, "attnlrp", **kw),
    "cp_lrp": lambda model, images, target=None, **kw: attn_lrp(model, images, target, "cp_lrp", **kw),
    "rollout": attention_rollout,
    "gradxinput": gradient_x_input,
    "random": random_map,
}
if tuple(METHODS) != ATTRIBUTION_METHODS:  # the config offers exactly these, in this order
    raise ImportError(f"analyses.model.lrp.METHODS {tuple(METHODS)} differ from the config's ATTRIBUTION_METHODS "
                      f"{ATTRIBUTION_METHODS}")


def attribution_map(method: str, model: nn.Module, images: Float[Tensor, "batch channel height width"],
                    target: Target = None, **options) -> Float[Tensor, "batch grid grid"]:
    """The map of ``method`` (a key of :data:`METHODS`) with its ``options``."""
    check_choice(method, tuple(METHODS), "attribution method")
    return METHODS[method](model, images, target, **options)


__all__ = [
    "ATTN_LRP_VARIANTS", "ATTRIBUTION_METHODS", "CheferCache", "CheferRelevance", "LAYERSCALE_RULES", "METHODS",
    "POOL_ROWS", "attention_rollout", "attn_lrp", "attn_lrp_hooks", "attribution_map", "chefer_cache",
    "chefer_propagate", "chefer_rollout", "gradient_x_input", "lrp_add", "lrp_clone", "lrp_linear",
    "lrp_linear_reference", "lrp_matmul", "random_map", "resolve_target", "safe_divide", "transformer_attribution",
]
