"""Hook names, shapes, circuit sites, replacement semantics and the attention fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

BLOCK_HOOKS = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
    "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
    "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre",
    "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


def test_hook_names_are_pinned_in_execution_order(hooked_deit3_base):
    expected = (["hook_embed", "hook_pos_embed", "hook_full_embed"]
                + [f"blocks.{layer}.{name}" for layer in range(12) for name in BLOCK_HOOKS]
                + ["ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled"])
    assert list(hooked_deit3_base.hook_dict) == expected
    from hooked_vit.hook_table import hook_names

    assert hook_names(12) == expected


def test_family_final_hook_names_are_pinned():
    """The hooks each family adds: fc_norm after pooling, a distilled DeiT's second pooled token, CLIP's ln_pre,
    SigLIP's attention pool, EVA-02's RoPE, gated MLP and inner norms; the width of token_avg's pooled features."""
    import dataclasses

    from hooked_vit.config import HookedViTConfig
    from hooked_vit.hook_table import hook_names, hook_shape

    base = HookedViTConfig(img_size=32, patch_size=8, in_chans=3, d_model=64, n_layers=1, n_heads=2, d_mlp=128,
                           n_classes=5)
    blocks = [f"blocks.0.{name}" for name in BLOCK_HOOKS]
    embed = ["hook_embed", "hook_pos_embed", "hook_full_embed"]
    assert hook_names(1, base) == hook_names(1) == embed + blocks + [
        "ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled"]
    assert hook_names(1, dataclasses.replace(base, pooling="avg", fc_norm=True)) == embed + blocks + [
        "fc_norm.hook_scale", "fc_norm.hook_normalized", "hook_pooled"]
    assert hook_names(1, dataclasses.replace(base, has_dist_token=True)) == embed + blocks + [
        "ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled", "hook_pooled_dist"]
    assert hook_names(1, dataclasses.replace(base, n_registers=4)) == hook_names(1)
    # CLIP: ln_pre (timm's norm_pre) between the embedding and block 0.
    assert hook_names(1, dataclasses.replace(base, ln_pre=True, patch_bias=False, act_fn="quick_gelu")) == embed + [
        "ln_pre.hook_scale", "ln_pre.hook_normalized"] + blocks + [
        "ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled"]
    # SigLIP: no class token, the attention-pool head on the final-norm patch tokens.
    pool = ["hook_latent", "hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_attn_out",
            "norm.hook_scale", "norm.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out"]
    assert hook_names(1, dataclasses.replace(base, class_token=False, pooling="map")) == embed + blocks + [
        "ln_final.hook_scale", "ln_final.hook_normalized"] + [f"attn_pool.{name}" for name in pool] + ["hook_pooled"]
    # transformers' DINOv2 classifier: CLS and the mean patch token side by side (hook_pooled [batch, 2 d_model]).
    token_avg = dataclasses.replace(base, pooling="token_avg")
    assert hook_names(1, token_avg) == hook_names(1)
    assert hook_shape("hook_pooled", token_avg, 2) == (2, 128)
    # timm's Eva (EVA-02, DINOv3): RoPE, a gated (SwiGLU) MLP, the inner norms on z and on the MLP's hidden.
    eva = dataclasses.replace(base, rope={"rope_type": "cat", "temperature": 10000.0, "grid_indexing": "ij",
                                          "grid_offset": 0.0, "rotate_half": False, "ref_feat_shape": None},
                              gated_mlp=True, mlp_norm=True, attn_norm=True, act_fn="silu", timm_class="Eva")
    assert hook_names(1, eva) == embed + [f"blocks.0.{name}" for name in [
        "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
        "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
        "attn.norm.hook_scale", "attn.norm.hook_normalized", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale",
        "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "mlp.norm.hook_scale",
        "mlp.norm.hook_normalized", "hook_mlp_out", "hook_resid_post"]] + [
        "ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled"]


def test_optional_tl_hook_names_are_pinned_and_listed_only_when_enabled(small_hooked):
    """TransformerLens's optional inputs: listed in hook_dict (in firing order) only while enabled."""
    import copy

    from hooked_vit.hook_table import hook_names

    model = copy.deepcopy(small_hooked)
    assert hook_names(2) == list(model.hook_dict)
    model.set_use_attn_in(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    block = (BLOCK_HOOKS[:1] + ["hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"] + BLOCK_HOOKS[1:12]
             + ["hook_mlp_in"] + BLOCK_HOOKS[12:])
    expected = (["hook_embed", "hook_pos_embed", "hook_full_embed"]
                + [f"blocks.{layer}.{name}" for layer in range(2) for name in block]
                + ["ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled"])
    assert list(model.hook_dict) == expected
    assert hook_names(2, use_attn_in=True, use_split_qkv_input=True, use_hook_mlp_in=True) == expected
    model.set_use_split_qkv_input(False)
    assert hook_names(2, use_attn_in=True, use_hook_mlp_in=True) == list(model.hook_dict)
    assert "blocks.0.hook_attn_in" in model.hook_dict and "blocks.0.hook_q_input" not in model.hook_dict


@pytest.mark.parametrize("optional", [False, True], ids=["default", "tl_inputs"])
def test_hooks_fire_in_listed_order_with_listed_shapes(small_hooked, images_64, optional):
    import copy

    if optional:  # a copy with TL's optional input hooks on (ln1's hooks then have a head axis)
        small_hooked = copy.deepcopy(small_hooked)
        small_hooked.set_use_attn_in(True)
        small_hooked.set_use_hook_mlp_in(True)
    _check_firing_order(small_hooked, images_64)


def _check_firing_order(small_hooked, images_64):
    from hooked_vit.hook_table import hook_shape

    small_hooked.set_use_attn_result(True)
    fired = []
    try:
        small_hooked.run_with_hooks(
            images_64, fwd_hooks=[(lambda name: True, lambda act, hook: fired.append((hook.name, act.shape)))]
        )
    finally:
        small_hooked.set_use_attn_result(False)
    assert [name for name, _ in fired] == list(small_hooked.hook_dict)
    for name, shape in fired:
        assert tuple(shape) == hook_shape(name, small_hooked.cfg, batch=3), name


def test_circuit_site_registry(hooked_deit3_base):
    sites = hooked_deit3_base.sites
    assert len(sites) == 96
    assert [s.name for s in sites.at_layer(0)] == ["norm1", "q", "k", "v", "attn_out", "norm2", "mlp_act", "mlp_out"]
    assert sites[3, "mlp_act"].hook_name == "blocks.3.mlp.hook_post"
    assert sites[-1, "norm1"].hook_name == "blocks.11.ln1.hook_normalized"
    assert sites[2, "q"].unit == "head" and sites[2, "q"].width == 12 and sites[2, "q"].mask_shape == (12, 1)
    assert sites[2, "mlp_act"].unit == "feature" and sites[2, "mlp_act"].width == 3072
    assert sites.from_hook_name("blocks.7.hook_attn_out") == sites[7, "attn_out"]
    assert all(name in hooked_deit3_base.hook_dict for name in sites.hook_names)
    assert sites.n_units == 12 * (4 * 768 + 3 * 12 + 3072)
    with pytest.raises(KeyError, match="sites are"):
        sites[0, "mlp"]
    with pytest.raises(KeyError, match="out of range"):
        sites[12, "q"]


def test_site_unit_activation_is_head_norm(small_hooked, images_64):
    _, cache = small_hooked.run_with_cache(images_64, names_filter=["blocks.1.attn.hook_v", "blocks.1.mlp.hook_post"])
    v_site, act_site = small_hooked.sites[1, "v"], small_hooked.sites[1, "mlp_act"]
    v = cache["v", 1]
    torch.testing.assert_close(v_site.unit_activation(v), v.pow(2).sum(-1).sqrt(), rtol=1e-6, atol=0)
    assert torch.equal(act_site.unit_activation(cache["mlp_act", 1]), cache["blocks.1.mlp.hook_post"])


def test_every_hook_value_is_used_downstream(small_hooked, images_64):
    """Replacing any hook's value changes the logits: nothing downstream bypasses a hook."""
    small_hooked.set_use_attn_result(True)
    try:
        clean = small_hooked(images_64)
        for name in small_hooked.hook_dict:
            # Random noise: a uniform shift would be invisible to LayerNorm (and to softmax, at k).
            perturb = (lambda act, hook: act * 1.5) if "scale" in name or "pattern" in name else \
                (lambda act, hook: act + 0.5 * torch.randn(act.shape, generator=torch.Generator().manual_seed(0)))
            patched = small_hooked.run_with_hooks(images_64, fwd_hooks=[(name, perturb)])
            assert not torch.allclose(patched, clean, atol=1e-4), name
    finally:
        small_hooked.set_use_attn_result(False)


def test_patching_residual_stream_reproduces_the_source_run(small_hooked, images_64):
    source, target = images_64[:1], images_64[1:2]
    _, cache = small_hooked.run_with_cache(source, names_filter=["blocks.1.hook_resid_pre"])
    patched = small_hooked.run_with_hooks(
        target, fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: cache["blocks.1.hook_resid_pre"])]
    )
    assert torch.equal(patched, small_hooked(source))


def test_attention_uses_sdpa_unless_scores_or_pattern_are_hooked(small_hooked, images_64, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    fast = small_hooked(images_64)
    assert len(calls) == 2
    calls.clear()
    _, cache = small_hooked.run_with_cache(images_64, names_filter=lambda n: n.endswith("hook_pattern"))
    assert not calls
    explicit = small_hooked.run_with_hooks(images_64, fwd_hooks=[("blocks.0.attn.hook_attn_scores", lambda a, hook: None)])
    assert len(calls) == 1  # block 1 only
    torch.testing.assert_close(explicit, fast, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache["pattern", 0].sum(-1), torch.ones(3, 6, 17), rtol=0, atol=1e-5)


def test_per_head_results_sum_to_attention_output(small_hooked, images_64):
    small_hooked.set_use_attn_result(True)
    try:
        logits, cache = small_hooked.run_with_cache(images_64)
    finally:
        small_hooked.set_use_attn_result(False)
    torch.testing.assert_close(logits, small_hooked(images_64), rtol=0, atol=1e-5)
    attn = small_hooked.blocks[0]
    # hook_result includes LayerScale: heads + LayerScaled bias = hook_attn_out (TL's identity)
    out = cache["blocks.0.attn.hook_result"].sum(2) + attn.attn.proj.bias * attn.ls1.gamma
    torch.testing.assert_close(out, cache["blocks.0.hook_attn_out"], rtol=0, atol=1e-5)


def test_lrp_style_detaching_changes_gradients_not_outputs(small_hooked, images_64):
    """LRP will detach LayerNorm scales and attention patterns through hooks."""
    images = images_64.clone().requires_grad_(True)
    plain = small_hooked(images)
    (plain_grad,) = torch.autograd.grad(plain[:, 3].sum(), images)
    detach = lambda act, hook: act.detach()  # noqa: E731
    with small_hooked.hooks(fwd_hooks=[(lambda n: n.endswith("hook_scale") or n.endswith("hook_pattern"), detach)]):
        modified = small_hooked(images)
        (modified_grad,) = torch.autograd.grad(modified[:, 3].sum(), images)
    torch.testing.assert_close(modified, plain, rtol=0, atol=1e-5)
    assert not torch.allclose(modified_grad, plain_grad, atol=1e-6)


def test_run_with_cache_options(small_hooked, images_64):
    logits, cache = small_hooked.run_with_cache(images_64, names_filter="blocks.0.hook_resid_post")
    assert list(cache.keys()) == ["blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match="metric="):
        small_hooked.run_with_cache(images_64, names_filter="hook_pooled", incl_bwd=True)
    _, cache = small_hooked.run_with_cache(images_64, names_filter="hook_pooled", incl_bwd=True,
                                           metric=lambda out: out[:, 0].sum())
    assert cache["hook_pooled_grad"].shape == cache["hook_pooled"].shape
    torch.testing.assert_close(cache["hook_pooled_grad"], small_hooked.head.weight[0].expand(3, -1))
    small_hooked.zero_grad(set_to_none=True)
    resid, cache = small_hooked.run_with_cache(images_64, stop_at_layer=1, names_filter="blocks.0.hook_resid_post")
    assert torch.equal(resid, cache["resid_post", 0])
    _, cache = small_hooked.run_with_cache(images_64[:1], remove_batch_dim=True, names_filter="hook_embed")
    assert cache["hook_embed"].shape == (17, 384)


def test_cache_conveniences(small_hooked, images_64):
    _, cache = small_hooked.run_with_cache(images_64)
    assert torch.equal(cache["mlp_act", 1], cache["blocks.1.mlp.hook_post"])
    assert torch.equal(cache["q", 0], cache["blocks.0.attn.hook_q"])  # TransformerLens shorthand
    assert torch.equal(cache.cls_token(("resid_post", 1)), cache["blocks.1.hook_resid_post"][:, 0])
    grid = cache.patch_grid("blocks.1.hook_resid_post")
    assert grid.shape == (3, 4, 4, 384)
    assert torch.equal(grid[:, 1, 2], cache["blocks.1.hook_resid_post"][:, 1 + 1 * 4 + 2])
    with pytest.raises(KeyError, match="names_filter"):
        small_hooked.run_with_cache(images_64, names_filter="hook_embed")[1]["blocks.0.hook_resid_pre"]
