"""Every hook of a HookedViT in execution order, with its shape and meaning (one source of truth
for :meth:`HookedViT.summary`, the README table and the pinned hook-name test)."""

from __future__ import annotations

from hooked_vit.config import HookedViTConfig

# (name, shape, meaning); block hooks are relative to ``blocks.{layer}``.
EMBED_HOOKS = [
    ("hook_embed", "batch pos d_model", "CLS token (DIST, registers; none for SigLIP) then the patch embeddings"),
    ("hook_pos_embed", "batch pos d_model", "position embedding (zero at CLS when no_embed_class, as in DeiT-III)"),
    ("hook_full_embed", "batch pos d_model", "embed + pos_embed: the input of block 0 (of ln_pre if any)"),
]
# CLIP's LayerNorm after the position embedding (timm's norm_pre), with cfg.ln_pre.
LN_PRE_HOOKS = [
    ("ln_pre.hook_scale", "batch pos 1", "ln_pre scale (CLIP's norm on embed + pos_embed)"),
    ("ln_pre.hook_normalized", "batch pos d_model", "ln_pre output: the input of block 0"),
]
BLOCK_HOOKS = [
    ("hook_resid_pre", "batch pos d_model", "residual stream entering the block"),
    ("ln1.hook_scale", "batch pos 1", "LayerNorm 1 scale sqrt(var + eps)"),
    ("ln1.hook_normalized", "batch pos d_model", "LayerNorm 1 output (site norm1)"),
    ("attn.hook_q", "batch pos head d_head", "queries (site q, unit: head)"),
    ("attn.hook_k", "batch pos head d_head", "keys (site k, unit: head)"),
    ("attn.hook_v", "batch pos head d_head", "values (site v, unit: head)"),
    ("attn.hook_attn_scores", "batch head query_pos key_pos", "q.k / sqrt(d_head), before softmax"),
    ("attn.hook_pattern", "batch head query_pos key_pos", "attention probabilities"),
    ("attn.hook_z", "batch pos head d_head", "pattern-weighted values, before the output projection"),
    ("attn.hook_result", "batch pos head d_model", "per-head output after LayerScale (only with use_attn_result): heads + b_O sum to hook_attn_out"),
    ("hook_attn_out", "batch pos d_model", "attention output after LayerScale, before the add (site attn_out)"),
    ("hook_resid_mid", "batch pos d_model", "residual stream after attention"),
    ("ln2.hook_scale", "batch pos 1", "LayerNorm 2 scale"),
    ("ln2.hook_normalized", "batch pos d_model", "LayerNorm 2 output (site norm2)"),
    ("mlp.hook_pre", "batch pos d_mlp", "fc1 output, before GELU"),
    ("mlp.hook_post", "batch pos d_mlp", "GELU output (site mlp_act)"),
    ("hook_mlp_out", "batch pos d_model", "MLP output after LayerScale, before the add (site mlp_out)"),
    ("hook_resid_post", "batch pos d_model", "residual stream leaving the block"),
]
FINAL_HOOKS = [
    ("ln_final.hook_scale", "batch pos 1", "final LayerNorm scale"),
    ("ln_final.hook_normalized", "batch pos d_model", "final LayerNorm output"),
    ("hook_pooled", "batch d_model", "final-norm CLS token: the classifier head's input"),
]

# Family-specific final hooks: the norm after pooling (timm's fc_norm, with pooling "avg" by
# default) replaces ln_final; a distilled DeiT has a second pooled token, its head_dist's input.
FC_NORM_HOOKS = [
    ("fc_norm.hook_scale", "batch 1", "LayerNorm scale of the pooled features (fc_norm, after pooling)"),
    ("fc_norm.hook_normalized", "batch d_model", "fc_norm output"),
    ("hook_pooled", "batch d_model", "normalized pooled features: the classifier head's input"),
]
DIST_HOOKS = [
    ("hook_pooled_dist", "batch d_model", "final-norm distillation token: head_dist's input"),
]
# SigLIP's attention-pool head (pooling "map", timm's AttentionPoolLatent) on the final-norm patch
# tokens: ``latent`` is its one query position, ``patch_pos`` the patch tokens it attends to.
ATTN_POOL_HOOKS = [
    ("attn_pool.hook_latent", "batch latent d_model", "the learned latent (query input) of the attention pool"),
    ("attn_pool.hook_q", "batch latent head d_head", "attention-pool query (q projection of the latent)"),
    ("attn_pool.hook_k", "batch patch_pos head d_head", "attention-pool keys of the final-norm patch tokens"),
    ("attn_pool.hook_v", "batch patch_pos head d_head", "attention-pool values of the final-norm patch tokens"),
    ("attn_pool.hook_attn_scores", "batch head latent patch_pos", "attention-pool q.k / sqrt(d_head)"),
    ("attn_pool.hook_pattern", "batch head latent patch_pos", "attention-pool probabilities over the patches"),
    ("attn_pool.hook_z", "batch latent head d_head", "attention-pool pattern-weighted values"),
    ("attn_pool.hook_attn_out", "batch latent d_model", "attention-pool output projection (its residual stream)"),
    ("attn_pool.norm.hook_scale", "batch latent 1", "attention-pool LayerNorm scale"),
    ("attn_pool.norm.hook_normalized", "batch latent d_model", "attention-pool LayerNorm output"),
    ("attn_pool.mlp.hook_pre", "batch latent d_mlp", "attention-pool MLP fc1 output"),
    ("attn_pool.mlp.hook_post", "batch latent d_mlp", "attention-pool MLP activation output"),
    ("attn_pool.hook_mlp_out", "batch latent d_model", "attention-pool MLP output; + attn_out = the pooled features"),
]

# TransformerLens's optional block hooks: (name, shape, meaning, the config flag that enables it,
# the default hook they follow). Left out of model.hook_dict (and hook_names) while their flag is off.
OPTIONAL_BLOCK_HOOKS = [
    ("hook_attn_in", "batch pos head d_model", "residual stream repeated per head, the attention's input (only "
     + "with use_attn_in)", "use_attn_in", "hook_resid_pre"),
    ("hook_q_input", "batch pos head d_model", "per-head query input, before ln1 (only with use_split_qkv_input)",
     "use_split_qkv_input", "hook_resid_pre"),
    ("hook_k_input", "batch pos head d_model", "per-head key input, before ln1 (only with use_split_qkv_input)",
     "use_split_qkv_input", "hook_resid_pre"),
    ("hook_v_input", "batch pos head d_model", "per-head value input, before ln1 (only with use_split_qkv_input)",
     "use_split_qkv_input", "hook_resid_pre"),
    ("hook_mlp_in", "batch pos d_model", "residual stream entering ln2 (only with use_hook_mlp_in)",
     "use_hook_mlp_in", "hook_resid_mid"),
]
OPTIONAL_HOOK_FLAGS = {name: flag for name, _, _, flag, _ in OPTIONAL_BLOCK_HOOKS}

# Block hooks of timm's Eva (EVA-02, DINOv3): (name, shape, meaning, the config field that makes the
# model have them, the default hook they follow).
EVA_BLOCK_HOOKS = [
    ("attn.hook_rot_q", "batch pos head d_head", "queries after the rotary embedding (RoPE; prefix tokens unrotated)",
     "rope", "attn.hook_v"),
    ("attn.hook_rot_k", "batch pos head d_head", "keys after the rotary embedding (RoPE; prefix tokens unrotated)",
     "rope", "attn.hook_v"),
    ("attn.norm.hook_scale", "batch pos 1", "scale of the LayerNorm on the concatenated heads' z (attn_norm)",
     "attn_norm", "attn.hook_z"),
    ("attn.norm.hook_normalized", "batch pos d_model", "that LayerNorm's output: proj's input (attn_norm)",
     "attn_norm", "attn.hook_z"),
    ("mlp.hook_pre_linear", "batch pos d_mlp", "fc1_x output, the gated branch (gated_mlp; hook_pre is then the "
     "gate's fc1_g output and hook_post act(pre) * pre_linear)", "gated_mlp", "mlp.hook_pre"),
    ("mlp.norm.hook_scale", "batch pos 1", "scale of the MLP's inner LayerNorm on hook_post (mlp_norm)",
     "mlp_norm", "mlp.hook_post"),
    ("mlp.norm.hook_normalized", "batch pos d_mlp", "the MLP's inner LayerNorm output: fc2's input (mlp_norm)",
     "mlp_norm", "mlp.hook_post"),
]

# Hooks without an axis over the model's n_ctx token positions (pos_slice leaves them whole).
POOLED_HOOKS = tuple(dict.fromkeys(name for name, shape, _ in FINAL_HOOKS + FC_NORM_HOOKS + DIST_HOOKS + ATTN_POOL_HOOKS
                                   if "pos" not in shape.split()))
_POOLED_MEANING = {
    "token": "final-norm CLS token: the classifier head's input",
    "avg": "mean of the final-norm patch tokens: the classifier head's input",
    "map": "attention-pool output (attn_out + mlp_out at its latent): the classifier head's input",
    "token_avg": "final-norm CLS token and the mean of the final-norm patch tokens side by side: the head's input",
}


def final_hooks(cfg: HookedViTConfig | None = None) -> list[tuple[str, str, str]]:
    """The hooks after the last block (name, shape, meaning) for ``cfg``'s pooling head (default:
    CLS-token pooling after ``ln_final``, as DeiT-III): ``ln_final`` (unless fc_norm), the attention
    pool's (pooling "map"), ``fc_norm``'s (fc_norm), ``hook_pooled``, ``hook_pooled_dist`` (DeiT)."""
    if cfg is None:
        return list(FINAL_HOOKS)
    hooks = [] if cfg.fc_norm else FINAL_HOOKS[:2]
    hooks += ATTN_POOL_HOOKS if cfg.pooling == "map" else []
    if cfg.fc_norm:
        hooks += FC_NORM_HOOKS
    else:
        width = "d_pooled" if cfg.pooling == "token_avg" else "d_model"
        hooks.append(("hook_pooled", f"batch {width}", _POOLED_MEANING[cfg.pooling]))
    return hooks + (DIST_HOOKS if cfg.has_dist_token else [])


def embed_hooks(cfg: HookedViTConfig | None = None) -> list[tuple[str, str, str]]:
    """The hooks before block 0 (name, shape, meaning): the embeddings, then ``ln_pre``'s (CLIP)."""
    return EMBED_HOOKS + (LN_PRE_HOOKS if cfg is not None and cfg.ln_pre else [])


def block_hook_names(use_attn_in: bool = False, use_split_qkv_input: bool = False,
                     use_hook_mlp_in: bool = False, cfg: HookedViTConfig | None = None) -> list[str]:
    """A block's hook names (relative to ``blocks.{layer}``) in firing order, with the optional
    TransformerLens hooks that the flags enable and, with ``cfg``, an Eva's hooks (RoPE, gated MLP,
    inner norms)."""
    flags = {"use_attn_in": use_attn_in, "use_split_qkv_input": use_split_qkv_input,
             "use_hook_mlp_in": use_hook_mlp_in}
    names = []
    for default, _, _ in BLOCK_HOOKS:
        if default == "attn.hook_result" and cfg is not None and cfg.attn_norm:
            continue  # no per-head results through a norm across the heads
        names.append(default)
        names += [name for name, _, _, field, after in EVA_BLOCK_HOOKS
                  if after == default and cfg is not None and getattr(cfg, field)]
        names += [name for name, _, _, flag, after in OPTIONAL_BLOCK_HOOKS if after == default and flags[flag]]
    return names


def hook_names(n_layers: int, cfg: HookedViTConfig | None = None, **flags: bool) -> list[str]:
    """All hook names of an ``n_layers``-block model, in the order they fire (``flags``:
    ``use_attn_in``, ``use_split_qkv_input``, ``use_hook_mlp_in``, see :func:`block_hook_names`;
    ``cfg``: the pooling head's hooks, see :func:`final_hooks`)."""
    return ([name for name, _, _ in embed_hooks(cfg)]
            + [f"blocks.{layer}.{name}" for layer in range(n_layers) for name in block_hook_names(**flags, cfg=cfg)]
            + [name for name, _, _ in final_hooks(cfg)])


def hook_shape(name: str, cfg: HookedViTConfig, batch: int) -> tuple[int, ...]:
    """Concrete shape of hook ``name`` for a batch of ``batch`` images (``ln1``'s hooks have a head
    axis while ``cfg.use_attn_in`` or ``cfg.use_split_qkv_input`` is on, as in TransformerLens)."""
    sizes = {"batch": batch, "pos": cfg.n_ctx, "query_pos": cfg.n_ctx, "key_pos": cfg.n_ctx,
             "d_model": cfg.d_model, "head": cfg.n_heads, "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "1": 1,
             "latent": 1, "patch_pos": cfg.n_patches, "d_pooled": cfg.d_pooled}
    suffix = name.split(".", 2)[2] if name.startswith("blocks.") else name
    shapes = {n: s for n, s, _ in (EMBED_HOOKS + LN_PRE_HOOKS + BLOCK_HOOKS + FINAL_HOOKS + FC_NORM_HOOKS
                                   + DIST_HOOKS + ATTN_POOL_HOOKS)}
    shapes.update({n: s for n, s, _ in final_hooks(cfg)})  # hook_pooled's width
    shapes.update({n: s for n, s, *_ in OPTIONAL_BLOCK_HOOKS + EVA_BLOCK_HOOKS})
    shape = shapes[suffix]
    if suffix.startswith("ln1.") and (cfg.use_attn_in or cfg.use_split_qkv_input):
        shape = shape.replace("pos", "pos head")
    return tuple(sizes[dim] for dim in shape.split())


def hook_table(cfg: HookedViTConfig | None = None) -> str:
    """Markdown table of the hooks; with ``cfg``, shapes also given in numbers."""

    def row(name: str, shape: str, meaning: str) -> str:
        numbers = ""
        if cfg is not None:
            probe = name.replace("{L}", "0")
            numbers = " = [" + ", ".join(str(n) for n in hook_shape(probe, cfg, 1)[1:]) + "]"
        return f"| `{name}` | `[{shape}]`{numbers} | {meaning} |"

    lines = ["| hook | shape | meaning |", "|---|---|---|"]
    lines += [row(*h) for h in embed_hooks(cfg)]
    block = {n: (s, m) for n, s, m in BLOCK_HOOKS}
    block.update({n: (s, m) for n, s, m, *_ in EVA_BLOCK_HOOKS})
    names = block_hook_names(cfg=cfg) if cfg is not None else [n for n, _, _ in BLOCK_HOOKS]
    lines += [row(f"blocks.{{L}}.{n}", *block[n]) for n in names]
    lines += [row(*h) for h in final_hooks(cfg)]
    return "\n".join(lines)
