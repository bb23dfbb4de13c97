"""CLIP image towers and SigLIP (issue 20): the parts other ViTs do not have, each checked against a
re-derivation written here from timm's parameters (not against HookedViT run twice).

CLIP: ``ln_pre`` (timm's ``norm_pre``) on embed + pos_embed with a bias-free patch embedding, and
QuickGELU ``x * sigmoid(1.702 x)``. SigLIP: no class token (positions are the patches), and the
attention-pool head (timm's ``AttentionPoolLatent``: one learned latent query over the final-norm
patch tokens, ``proj``, then ``out = attn_out + mlp(norm(attn_out))``). Plus one block at the real
224 px shapes, hook order and shapes, token choices without CLS, the refusals of TL weight processing,
save/load, and where cached hub weights are looked up. Tolerances: bit-identical on the default path;
re-derivations and the explicit path within 1e-5 relative (fp32 summation order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_timm

RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within RTOL of the larger of the two tensors' magnitudes (max |diff| / max |expected|)."""
    assert actual.shape == expected.shape
    assert float((actual - expected).abs().max()) <= RTOL * float(expected.abs().max()), \
        float((actual - expected).abs().max() / expected.abs().max())


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight + bias


@pytest.fixture(scope="module")
def clip():
    """A QuickGELU CLIP tower (OpenAI's ViT-B/32 layout), 1 block, 64 px: (timm model, HookedViT, images)."""
    from hooked_vit import HookedViT

    timm_model = make_timm("vit_base_patch32_clip_quickgelu_224", depth=1, img_size=64)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    return timm_model, HookedViT.from_timm(timm_model), images


@pytest.fixture(scope="module")
def siglip():
    """A SigLIP tower with a 10-class head after its attention pool, 1 block, 64 px (16 patches)."""
    from hooked_vit import HookedViT

    timm_model = make_timm("vit_base_patch16_siglip_224", depth=1, img_size=64, num_classes=10)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    return timm_model, HookedViT.from_timm(timm_model), images


@pytest.mark.parametrize("name", ["vit_base_patch16_clip_quickgelu_224", "vit_base_patch16_siglip_224"])
def test_one_block_at_the_real_shapes_equals_timm(name):
    """224 px, patch 16, width 768, 12 heads: bit-identical by default, 1e-5 with every hook cached."""
    from hooked_vit import HookedViT

    timm_model = make_timm(name, depth=1)
    model = HookedViT.from_timm(timm_model)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = timm_model(images)
        assert torch.equal(model(images), ref)
        out, cache = model.run_with_cache(images)
    _close(out, ref)
    assert cache["blocks.0.hook_resid_post"].shape == (1, model.cfg.n_ctx, 768)
    assert model.cfg.n_ctx == 196 + model.cfg.class_token


def test_ln_pre_on_a_bias_free_patch_embedding(clip):
    """ln_pre's hooks are the LayerNorm (eps 1e-5) of CLS + conv patches (no bias) + pos_embed, and
    block 0 reads its output; editing it in place edits the computation as zeroing timm's norm_pre does."""
    timm_model, model, images = clip
    assert model.patch_embed.proj.bias is None and model.cfg.ln_pre and model.cfg.ln_eps == 1e-5
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
        patches = F.conv2d(images, timm_model.patch_embed.proj.weight, stride=32).flatten(2).transpose(1, 2)
        tokens = torch.cat([timm_model.cls_token.expand(2, -1, -1), patches], dim=1) + timm_model.pos_embed
        norm = timm_model.norm_pre
        expected = _layer_norm(tokens, norm.weight, norm.bias, 1e-5)
        centred = tokens - tokens.mean(-1, keepdim=True)
        _close(cache["hook_full_embed"], tokens)
        _close(cache["ln_pre.hook_scale"], (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
        _close(cache["ln_pre.hook_normalized"], expected)
        assert torch.equal(cache["blocks.0.hook_resid_pre"], cache["ln_pre.hook_normalized"])

        def zero_in_place(act, hook):
            act[:, 1:] = 0

        handle = timm_model.norm_pre.register_forward_hook(lambda m, i, o: torch.cat([o[:, :1], 0 * o[:, 1:]], 1))
        try:
            ref = timm_model(images)
        finally:
            handle.remove()
        _close(model.run_with_hooks(images, fwd_hooks=[("ln_pre.hook_normalized", zero_in_place)]), ref)


def test_quick_gelu_is_clips_formula(clip):
    timm_model, model, images = clip
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"])
    pre = cache["blocks.0.mlp.hook_pre"]
    assert model.cfg.act_fn == "quick_gelu"
    _close(cache["blocks.0.mlp.hook_post"], pre * torch.sigmoid(1.702 * pre))
    assert not torch.allclose(cache["blocks.0.mlp.hook_post"], F.gelu(pre), atol=1e-3)


def _attention_pool_by_hand(timm_model, images, zero_head: int | None = None) -> dict[str, torch.Tensor]:
    """timm's AttentionPoolLatent re-derived per head with einsums from its parameters."""
    pool = timm_model.attn_pool
    x = timm_model.forward_features(images)  # final-norm tokens: the patches only (no class token)
    heads, d_head = pool.num_heads, pool.head_dim
    q = (pool.latent @ pool.q.weight.T + pool.q.bias).view(1, 1, heads, d_head).expand(x.shape[0], -1, -1, -1)
    kv = (x @ pool.kv.weight.T + pool.kv.bias).view(x.shape[0], x.shape[1], 2, heads, d_head)
    k, v = kv[:, :, 0], kv[:, :, 1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d_head**0.5
    pattern = scores.softmax(-1)
    if zero_head is not None:
        pattern = pattern.clone()
        pattern[:, zero_head] = 0
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    attn_out = z.flatten(2) @ pool.proj.weight.T + pool.proj.bias
    normed = _layer_norm(attn_out, pool.norm.weight, pool.norm.bias, pool.norm.eps)
    pre = normed @ pool.mlp.fc1.weight.T + pool.mlp.fc1.bias
    post = F.gelu(pre)
    mlp_out = post @ pool.mlp.fc2.weight.T + pool.mlp.fc2.bias
    pooled = (attn_out + mlp_out)[:, 0]
    return {"attn_pool.hook_q": q, "attn_pool.hook_k": k, "attn_pool.hook_v": v,
            "attn_pool.hook_attn_scores": scores, "attn_pool.hook_pattern": pattern, "attn_pool.hook_z": z,
            "attn_pool.hook_attn_out": attn_out, "attn_pool.norm.hook_normalized": normed,
            "attn_pool.mlp.hook_pre": pre, "attn_pool.mlp.hook_post": post, "attn_pool.hook_mlp_out": mlp_out,
            "hook_pooled": pooled, "logits": pooled @ timm_model.head.weight.T + timm_model.head.bias}


def test_attention_pool_hooks_match_a_re_derivation(siglip):
    timm_model, model, images = siglip
    with torch.no_grad():
        expected = _attention_pool_by_hand(timm_model, images)
        logits, cache = model.run_with_cache(images)
    assert torch.equal(cache["attn_pool.hook_latent"], model.attn_pool.latent.expand(2, -1, -1))
    for name, value in expected.items():
        _close(logits if name == "logits" else cache[name], value)
    assert cache["attn_pool.hook_pattern"].shape == (2, 12, 1, model.cfg.n_patches)


def test_attention_pool_pattern_patch_edits_the_output(siglip):
    """Zeroing head 3's pooling pattern in place gives the re-derivation with that head's pattern zero."""
    timm_model, model, images = siglip

    def zero_head(pattern, hook):
        pattern[:, 3] = 0

    with torch.no_grad():
        expected = _attention_pool_by_hand(timm_model, images, zero_head=3)
        patched = model.run_with_hooks(images, fwd_hooks=[("attn_pool.hook_pattern", zero_head)])
        _close(patched, expected["logits"])
        assert torch.equal(model(images), timm_model(images))  # the hook is gone


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_input_gradients_with_every_hook_cached_match_timms(which, request):
    """Backward through the explicit path (ln_pre, QuickGELU, the attention pool), hooks caching gradients."""
    timm_model, model, images = request.getfixturevalue(which)
    ref_images, hooked_images = images.clone().requires_grad_(), images.clone().requires_grad_()
    timm_model(ref_images)[:, 3].sum().backward()
    _, cache = model.run_with_cache(hooked_images, incl_bwd=True, metric=lambda out: out[:, 3].sum())
    _close(hooked_images.grad, ref_images.grad)
    assert "hook_pooled_grad" in cache and "blocks.0.hook_resid_pre_grad" in cache


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_hooks_fire_in_listed_order_with_listed_shapes(which, request):
    from hooked_vit.hook_table import hook_names, hook_shape

    _, model, images = request.getfixturevalue(which)
    fired = []
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            model.run_with_hooks(images, fwd_hooks=[(lambda name: True,
                                                     lambda act, hook: fired.append((hook.name, act.shape)))])
    finally:
        model.set_use_attn_result(False)
    assert [name for name, _ in fired] == list(model.hook_dict) == hook_names(1, model.cfg)
    for name, shape in fired:
        assert tuple(shape) == hook_shape(name, model.cfg, batch=2), name
    assert ("ln_pre.hook_normalized" in model.hook_dict) == (which == "clip")
    assert ("attn_pool.hook_pattern" in model.hook_dict) == (which == "siglip")
    assert [s.name for s in model.sites.at_layer(0)] == ["norm1", "q", "k", "v", "attn_out", "norm2", "mlp_act",
                                                         "mlp_out"]


def test_positions_and_token_choices_without_a_class_token(siglip):
    from hooked_vit.errors import InvalidArgumentError
    from hooked_vit.tokens import hook_layout, select_tokens

    _, model, images = siglip
    cfg = model.cfg
    assert (cfg.class_token, cfg.n_prefix_tokens, cfg.n_ctx, cfg.pooling) == (False, 0, 16, "map")
    assert model.cls_token is None
    assert model.to_str_tokens() == [f"r{r}c{c}" for r in range(4) for c in range(4)]
    act = torch.arange(16, dtype=torch.float32)[None, :, None].expand(2, -1, cfg.d_model)
    layout = hook_layout(model, "blocks.0.hook_resid_post")
    assert select_tokens(act, layout, "patch", cfg.n_ctx)[0, :, 0].tolist() == list(range(16))
    with pytest.raises(InvalidArgumentError, match="no class token"):
        select_tokens(act, layout, "cls", cfg.n_ctx)
    pooled = hook_layout(model, "attn_pool.hook_z")
    assert not pooled.has_positions and pooled.d_in == cfg.d_model and pooled.stop_at_layer is None
    with pytest.raises(InvalidArgumentError, match="inside the attention pool"):
        hook_layout(model, "attn_pool.hook_k")
    with pytest.raises(InvalidArgumentError, match="not linear in the residual stream"):
        model.class_residual_directions([0, 1])
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=["blocks.0.hook_resid_post"])
    grid = cache.patch_grid("blocks.0.hook_resid_post")
    assert torch.equal(grid[:, 1, 2], cache["blocks.0.hook_resid_post"][:, 4 + 2])


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_transformer_lens_weight_processing_is_refused_in_one_line(which, request):
    from hooked_vit.errors import InvalidArgumentError

    _, model, _ = request.getfixturevalue(which)
    with pytest.raises(InvalidArgumentError, match="ln_pre \\(CLIP\\)") as err:
        model.process_weights_()  # refused before any weight changes
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_save_and_load(which, request, tmp_path):
    from hooked_vit import HookedViT

    _, model, images = request.getfixturevalue(which)
    loaded = HookedViT.from_pretrained(model.save_pretrained(tmp_path / which))
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_cached_hub_weights_are_looked_up_in_timms_repo(monkeypatch):
    """A QuickGELU alias shares the GELU model's hub repo (timm's hf_hub_id), so the HF cache is read there."""
    import huggingface_hub

    from hooked_vit.loading import _cached_hub_file
    from hooked_vit.pretrained import get_spec

    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename: asked.append(repo))
    assert _cached_hub_file(get_spec("clip_vitb16")) is None
    _cached_hub_file(get_spec("siglip2_vitb16"))
    assert asked == ["timm/vit_base_patch16_clip_224.openai"] * 2 + ["timm/vit_base_patch16_siglip_224.v2_webli"] * 2
