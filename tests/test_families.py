"""Parity of HookedViT with timm across the supported VisionTransformer families (issue 20): plain
ViT/AugReg, DeiT v1 (with the distillation token and its second head), DeiT-III, DINOv2 with and
without registers (headless), average pooling with fc_norm, CLIP image towers (ln_pre, bias-free patch
embedding, GELU or QuickGELU, projection head), SigLIP (no class token; attention-pool head, or the gap
variant's average pooling) and an attention pool behind CLS + registers; plus the one-line refusals and
the aliases. CLIP/SigLIP specifics (their own hooks against a re-derivation, one block at 224 px) are in
tests/test_families_clip_siglip.py.

Random weights at each family's real width, heads and patch size, depth cut to 2 blocks and a small
image for time; LayerScale set to O(1) values (conftest.make_timm). Tolerances: the default path runs
timm's own kernels on identically laid-out tensors, so outputs are bit-identical (atol=0); the explicit
path (everything cached, so attention patterns and LayerNorm scales are materialised) is within 1e-5
relative to the output's magnitude (measured <= 3e-6).
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_timm

EXPLICIT_RTOL = 1e-5

# id: (timm name, kwargs, prefix token labels)
FAMILIES = {
    "vit_augreg": ("vit_base_patch16_224", dict(img_size=64), ["CLS"]),
    "deit": ("deit_small_patch16_224", dict(img_size=64), ["CLS"]),
    "deit_distilled": ("deit_small_distilled_patch16_224", dict(img_size=64), ["CLS", "DIST"]),
    "deit3": ("deit3_small_patch16_224", dict(img_size=64), ["CLS"]),
    "dinov2": ("vit_base_patch14_dinov2", dict(img_size=56), ["CLS"]),
    "dinov2_reg": ("vit_base_patch14_reg4_dinov2", dict(img_size=56), ["CLS", "REG0", "REG1", "REG2", "REG3"]),
    "avg_fc_norm": ("vit_base_patch16_224", dict(img_size=64, global_pool="avg"), ["CLS"]),
    "avg_norm_first": ("vit_base_patch16_224", dict(img_size=64, global_pool="avg", fc_norm=False), ["CLS"]),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=64), ["CLS"]),
    "clip_quickgelu": ("vit_base_patch32_clip_quickgelu_224", dict(img_size=64), ["CLS"]),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=64), []),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", dict(img_size=64), []),
    "map_after_prefix": ("vit_base_patch16_224", dict(img_size=32, global_pool="map", reg_tokens=2),
                         ["CLS", "REG0", "REG1"]),
}
HEADLESS = ("dinov2", "dinov2_reg", "siglip", "siglip_gap")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(id, timm model, HookedViT, images) for one family, 2 blocks."""
    from hooked_vit import HookedViT

    name, kwargs, _ = FAMILIES[request.param]
    timm_model = make_timm(name, depth=2, **kwargs)
    size = kwargs["img_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    return request.param, timm_model, HookedViT.from_timm(timm_model), images


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_output_equals_timm(family):
    """Bit-identical on the default path; within 1e-5 relative with every hook cached."""
    _, timm_model, model, images = family
    with torch.no_grad():
        ref = timm_model(images)
        assert torch.equal(model(images), ref)
        out, _ = model.run_with_cache(images)
    assert _relative_error(out, ref) <= EXPLICIT_RTOL


def test_headless_and_pooled_are_timms_pre_logits(family):
    """hook_pooled is the (class) head's input; a headless model returns timm's pooled features."""
    fid, timm_model, model, images = family
    with torch.no_grad():
        features = timm_model.forward_features(images)
        pre_logits = timm_model.forward_head(features, pre_logits=True)
        _, cache = model.run_with_cache(images, names_filter=["hook_pooled"])
        out = model(images)
    if fid == "deit_distilled":  # two heads: hook_pooled is CLS's, hook_pooled_dist DIST's; timm averages them
        assert torch.equal(cache["hook_pooled"], features[:, 0])
        return
    assert torch.equal(cache["hook_pooled"], pre_logits)
    if fid in HEADLESS:
        assert model.cfg.n_classes == 0 and torch.equal(out, pre_logits)


def test_to_timm_round_trips(family):
    _, timm_model, model, images = family
    back = model.to_timm()
    assert type(back) is type(timm_model)
    ref, got = timm_model.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with torch.no_grad():
        assert torch.equal(back(images), timm_model(images))


def test_every_block_hook_is_cached_over_every_position(family):
    from hooked_vit.hook_table import hook_names

    fid, _, model, images = family
    prefix = FAMILIES[fid][2]
    cfg = model.cfg
    tokens = model.to_str_tokens()
    assert len(tokens) == cfg.n_ctx == cfg.n_patches + len(prefix)
    assert tokens[:len(prefix)] == prefix and tokens[len(prefix)] == "r0c0"
    assert cfg.n_registers == sum(t.startswith("REG") for t in prefix)
    assert cfg.has_dist_token == ("DIST" in prefix)
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    expected = [n for n in hook_names(cfg.n_layers, cfg) if not n.endswith("hook_result")]
    assert list(cache.keys()) == expected == [n for n in model.hook_dict if not n.endswith("hook_result")]
    for layer in range(cfg.n_layers):
        assert cache[f"blocks.{layer}.hook_resid_post"].shape == (2, cfg.n_ctx, cfg.d_model)
        assert cache[f"blocks.{layer}.attn.hook_pattern"].shape == (2, cfg.n_heads, cfg.n_ctx, cfg.n_ctx)
        for site in model.sites.at_layer(layer):
            assert cache[site.hook_name].shape[:2] == (2, cfg.n_ctx)
    assert cache["hook_pooled"].shape == (2, cfg.d_model)
    assert cache.patch_grid("blocks.0.hook_resid_post").shape == (2, cfg.grid_size, cfg.grid_size, cfg.d_model)


def test_distilled_heads_in_train_and_eval_mode_as_timm():
    """timm averages the two heads' logits in eval and (by default) in train mode; with
    set_distilled_training(True) in train mode it returns both. HookedViT does the same."""
    from hooked_vit import HookedViT

    timm_model = make_timm("deit_small_distilled_patch16_224", depth=2, img_size=64)
    model = HookedViT.from_timm(timm_model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=["hook_pooled", "hook_pooled_dist"])
        logits = model(images)
        both = (model.head(cache["hook_pooled"]) + model.head_dist(cache["hook_pooled_dist"])) / 2
        assert torch.equal(logits, both)
        timm_model.train(), model.train()
        assert torch.equal(model(images), timm_model(images))
        timm_model.set_distilled_training(True), model.set_distilled_training(True)
        ref, got = timm_model(images), model(images)
        assert isinstance(got, tuple) and all(torch.equal(a, b) for a, b in zip(got, ref))
        assert model.to_timm().distilled_training
        timm_model.eval(), model.eval()
        assert torch.equal(model(images), timm_model(images))


def test_registers_are_kept_out_of_patch_tokens():
    from hooked_vit import HookedViT
    from hooked_vit.tokens import hook_layout, select_tokens

    model = HookedViT.from_timm(make_timm("vit_base_patch14_reg4_dinov2", depth=1, img_size=28))
    act = torch.arange(model.cfg.n_ctx, dtype=torch.float32)[None, :, None].expand(1, -1, model.cfg.d_model)
    layout = hook_layout(model, "blocks.0.hook_resid_post")
    patches = select_tokens(act, layout, "patch", model.cfg.n_ctx)
    assert patches[0, :, 0].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert model.W_pos.shape == (model.cfg.n_ctx, model.cfg.d_model) and not model.W_pos[:5].any()
    with pytest.raises(ValueError, match="headless"):
        _ = model.W_U


def test_save_and_load_a_register_model(tmp_path):
    from hooked_vit import HookedViT

    model = HookedViT.from_timm(make_timm("vit_base_patch14_reg4_dinov2", depth=1, img_size=28))
    images = torch.randn(1, 3, 28, 28)
    loaded = HookedViT.from_pretrained(model.save_pretrained(tmp_path / "reg"))
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


# timm name, kwargs, features the refusal must name
REFUSED = [
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1)), ["not a timm VisionTransformer", "windowed attention"]),
    ("beit_base_patch16_224", dict(depth=1), ["not a timm VisionTransformer", "relative position bias"]),
    ("vit_base_patch16_rope_224", dict(depth=1), ["attention AttentionRope"]),  # timm Eva: tests/test_families_eva.py
    ("vit_small_patch16_rope_mixed_224", dict(depth=1), ["RotaryEmbeddingMixed", "attention AttentionRope"]),
    ("eva02_tiny_patch14_224", dict(depth=1, qk_norm=True), ["qk_norm (every block)"]),
    ("vit_small_patch16_dinov3", dict(depth=1, init_values=1.0, attn_only_layer_scale=True), ["attn_only_layer_scale"]),
    ("eva_giant_patch14_224", dict(depth=1, use_post_norm=True), ["EvaBlockPostNorm"]),
    ("vit_base_patch16_siglip_224", dict(depth=1, class_token=True, pool_include_prefix=True),
     ["pool_include_prefix=True"]),
    ("vit_base_patch16_224", dict(depth=1, global_pool="prr"), ["global_pool='prr'", "PRR attention pool"]),
    ("vit_base_patch32_clip_224", dict(depth=1, act_layer="silu"), ["MLP activation SiLU"]),
    ("vit_base_patch16_224", dict(depth=2, qk_norm=True, dynamic_img_size=True), ["qk_norm (every block)",
                                                                                  "dynamic_img_size"]),
    ("vit_giant_patch14_dinov2", dict(depth=1), ["gated (GLU) MLP"]),
    ("vit_base_patch16_224", dict(depth=1, global_pool="max"), ["global_pool='max'"]),
]


@pytest.mark.parametrize("name, kwargs, features", REFUSED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(REFUSED)])
def test_unsupported_models_are_refused_in_one_line(name, kwargs, features):
    """Decided from the modules alone, before any weight is read (the timm model is on the meta device)."""
    from hooked_vit import HookedViT
    from hooked_vit.errors import UnsupportedModelError

    with torch.device("meta"):
        timm_model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedModelError) as err:
        HookedViT.from_timm(timm_model)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"HookedViT cannot load {name}")
    for feature in features:
        assert feature in message, (feature, message)


@pytest.mark.parametrize("alias, hub_name, n_classes, n_registers, dist", [
    ("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m", 0, 4, False),
    ("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", 0, 0, False),
    ("deit_small_distilled", "deit_small_distilled_patch16_224.fb_in1k", 1000, 0, True),
    ("clip_vitb16", "vit_base_patch16_clip_quickgelu_224.openai", 512, 0, False),
    ("siglip2_vitb16", "vit_base_patch16_siglip_224.v2_webli", 0, 0, False),
    ("siglip2_vitb16_gap", "vit_base_patch16_siglip_gap_224.v2_webli", 0, 0, False),
    ("dinov3_vitb16", "vit_base_patch16_dinov3.lvd1689m", 0, 4, False),
    ("eva02_vitb14_in1k", "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", 1000, 0, False),
    ("eva02_clip_vitb16", "eva02_base_patch16_clip_224.merged2b", 512, 0, False),
])  # every alias's architecture and preprocessing: test_model_parity.py::test_every_registered_alias_matches_timm_architecture
def test_aliases_resolve_without_downloading(alias, hub_name, n_classes, n_registers, dist):
    from hooked_vit.loading import config_from_timm, create_timm_from_spec
    from hooked_vit.pretrained import get_spec, resolve_model_name

    assert resolve_model_name(alias) == (None, alias)
    spec = get_spec(alias)
    assert spec.hub_name == hub_name and get_spec(hub_name) is spec
    pretrained_cfg = timm.models.get_pretrained_cfg(hub_name).to_dict()
    for key, value in spec.preprocessing.items():
        expected = pretrained_cfg[key]
        assert (list(expected) if isinstance(expected, tuple) else expected) == value, key
    with torch.device("meta"):  # architecture only, no weights
        cfg = config_from_timm(create_timm_from_spec(spec))
    assert (cfg.n_classes, cfg.n_registers, cfg.has_dist_token) == (n_classes, n_registers, dist)
    assert spec.extra["num_classes"] == n_classes
