"""Parity of HookedViT with timm on the real deit3_base architecture (random weights, fp32, CPU).

Tolerances: the default path runs timm's own kernels (F.layer_norm, scaled_dot_product_attention)
on identically laid-out tensors, so logits and every cached site are bit-identical (atol=0). The
explicit path (taken when LayerNorm scales or attention scores/patterns are hooked) computes the
same formulas with different fp32 summation order; over 12 blocks with O(1) LayerScale its
logits stay within 1e-5 of timm's (measured ~2e-6 on logits of magnitude ~2).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_timm

EXPLICIT_ATOL = 1e-5


def capture_timm(timm_model, images, grad_target=None):
    """Intermediates of a timm ViT via torch forward hooks, keyed by the HookedViT hook name; with
    ``grad_target(logits)`` also their gradients, keyed ``<name>_grad``."""
    acts, views = {}, {}

    def save(name, tensor, fn):
        acts[name], views[name] = tensor, fn  # fn maps timm's tensor (and its grad) to the hook's layout
        if tensor.requires_grad:
            tensor.retain_grad()

    handles = []

    def out_hook(module, name, fn=lambda t: t):
        handles.append(module.register_forward_hook(lambda m, i, o: save(name, o, fn)))

    def in_hook(module, name, fn=lambda t: t):
        handles.append(module.register_forward_pre_hook(lambda m, i: save(name, i[0], fn)))

    out_hook(timm_model.patch_embed, "patch_embed")
    out_hook(timm_model.norm_pre, "hook_full_embed")
    for i, blk in enumerate(timm_model.blocks):
        p = f"blocks.{i}."
        heads, d_head = blk.attn.num_heads, blk.attn.head_dim
        split = lambda t, j: t.unflatten(-1, (3, heads, d_head))[..., j, :, :]  # noqa: E731
        in_hook(blk, p + "hook_resid_pre")
        out_hook(blk.norm1, p + "ln1.hook_normalized")
        for j, name in enumerate("qkv"):
            out_hook(blk.attn.qkv, p + f"attn.hook_{name}", lambda t, j=j: split(t, j))
        if not blk.attn.fused_attn:  # attn_drop (identity in eval) receives the pattern
            in_hook(blk.attn.attn_drop, p + "attn.hook_pattern")
        in_hook(blk.attn.proj, p + "attn.hook_z", lambda t: t.unflatten(-1, (heads, d_head)))
        out_hook(blk.ls1, p + "hook_attn_out")
        in_hook(blk.norm2, p + "hook_resid_mid")
        out_hook(blk.norm2, p + "ln2.hook_normalized")
        out_hook(blk.mlp.fc1, p + "mlp.hook_pre")
        out_hook(blk.mlp.act, p + "mlp.hook_post")
        out_hook(blk.ls2, p + "hook_mlp_out")
        out_hook(blk, p + "hook_resid_post")
    out_hook(timm_model.norm, "ln_final.hook_normalized")
    in_hook(timm_model.head, "hook_pooled")
    try:
        with torch.set_grad_enabled(grad_target is not None):
            logits = timm_model(images)
            if grad_target is not None:
                grad_target(logits).backward()
    finally:
        for h in handles:
            h.remove()
    grads = {f"{k}_grad": views[k](v.grad) for k, v in acts.items() if v.grad is not None}
    return logits.detach(), {k: views[k](v.detach()) for k, v in acts.items()}, grads


def logsumexp_target(logits: torch.Tensor) -> torch.Tensor:
    """What the gradient tests differentiate: it reaches every logit, so every head row gets a gradient."""
    return logits.logsumexp(-1).sum()


# One timm forward (and one forward+backward) of deit3_base serves every test below that compares
# with timm's default path: forward hooks that only store tensors do not change what timm computes.
@pytest.fixture(scope="module")
def timm_default(timm_deit3_base, images_224):
    """timm's logits and every captured site on its default (fused attention) path, no grad."""
    logits, ref, _ = capture_timm(timm_deit3_base, images_224)
    return logits, ref


@pytest.fixture(scope="module")
def timm_grads(timm_deit3_base, images_224):
    """timm's gradients of :func:`logsumexp_target`: per captured site (``<name>_grad``) and per
    parameter (under the HookedViT parameter names)."""
    from hooked_vit.loading import timm_to_hooked_state_dict

    timm_deit3_base.zero_grad(set_to_none=True)
    _, _, site_grads = capture_timm(timm_deit3_base, images_224, grad_target=logsumexp_target)
    param_grads = timm_to_hooked_state_dict({n: p.grad for n, p in timm_deit3_base.named_parameters()})
    timm_deit3_base.zero_grad(set_to_none=True)
    return site_grads, param_grads


def test_logits_bit_identical_on_default_path(timm_default, hooked_deit3_base, images_224):
    with torch.no_grad():
        assert torch.equal(hooked_deit3_base(images_224), timm_default[0])


def test_embeddings_match_timm(timm_deit3_base, timm_default, hooked_deit3_base, images_224):
    ref = timm_default[1]
    _, cache = hooked_deit3_base.run_with_cache(images_224, names_filter=lambda n: "embed" in n)
    assert torch.equal(cache["hook_embed"][:, 1:], ref["patch_embed"])
    assert torch.equal(cache["hook_embed"][:, 0], timm_deit3_base.cls_token[0].expand(2, -1))
    # DeiT-III adds no position embedding to CLS (no_embed_class): the hook shows a zero row there.
    assert torch.equal(cache["hook_pos_embed"][:, 1:], timm_deit3_base.pos_embed.detach().expand(2, -1, -1))
    assert not cache["hook_pos_embed"][:, 0].any()


def test_every_site_bit_identical_when_no_explicit_path_is_needed(timm_default, hooked_deit3_base, images_224):
    ref_logits, ref = timm_default
    fast = [n for n in ref if not re.search(r"hook_scale|attn_scores|pattern|patch_embed", n)]
    logits, cache = hooked_deit3_base.run_with_cache(images_224, names_filter=fast)
    assert torch.equal(logits, ref_logits)
    assert len(fast) == 1 + 12 * 13 + 2
    for name in fast:
        assert torch.equal(cache[name], ref[name]), name


def test_every_site_matches_timm_on_explicit_path(timm_deit3_base, hooked_deit3_base, images_224):
    for blk in timm_deit3_base.blocks:
        blk.attn.fused_attn = False
    try:
        ref_logits, ref, _ = capture_timm(timm_deit3_base, images_224)
    finally:
        for blk in timm_deit3_base.blocks:
            blk.attn.fused_attn = True
    logits, cache = hooked_deit3_base.run_with_cache(images_224)  # caches all: explicit path
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=EXPLICIT_ATOL)
    assert any(n.endswith("hook_pattern") for n in ref)
    for name, value in ref.items():
        if name == "patch_embed":
            continue
        scale = value.abs().max().item()
        torch.testing.assert_close(cache[name], value, rtol=0, atol=EXPLICIT_ATOL * max(1.0, scale), msg=name)
    # LayerNorm scales: sqrt(biased variance + eps) of the norm's input.
    resid = ref["blocks.5.hook_resid_mid"]
    expected = (resid.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(cache["blocks.5.ln2.hook_scale"], expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_gradients_match_timm(timm_grads, hooked_deit3_base, images_224, explicit):
    ref_grads = timm_grads[0]
    names = ["hook_full_embed", "blocks.0.attn.hook_q", "blocks.4.mlp.hook_post", "blocks.11.hook_attn_out",
             "blocks.11.hook_resid_post", "hook_pooled"]
    if explicit:
        names.append("blocks.3.attn.hook_pattern")  # forces the explicit path in block 3
    _, cache = hooked_deit3_base.run_with_cache(images_224, names_filter=names, incl_bwd=True,
                                                metric=logsumexp_target)
    for name in names:
        if name.endswith("hook_pattern"):
            assert cache[name + "_grad"].shape == (2, 12, 197, 197)
            continue
        ref = ref_grads[name + "_grad"]
        torch.testing.assert_close(cache[name + "_grad"], ref, rtol=0,
                                   atol=EXPLICIT_ATOL * max(1.0, ref.abs().max().item()), msg=name)
    hooked_deit3_base.zero_grad(set_to_none=True)


def test_parameter_gradients_match_timm(timm_grads, hooked_deit3_base, images_224):
    hooked_deit3_base.zero_grad(set_to_none=True)
    logsumexp_target(hooked_deit3_base(images_224)).backward()
    param_grads = timm_grads[1]
    for name, param in hooked_deit3_base.named_parameters():
        assert torch.equal(param.grad, param_grads[name]), name
    hooked_deit3_base.zero_grad(set_to_none=True)


def test_to_timm_round_trip_is_exact(timm_deit3_base, timm_default, images_224):
    from hooked_vit import HookedViT

    back = HookedViT.from_timm(timm_deit3_base).to_timm()
    ref = timm_deit3_base.state_dict()
    assert list(back.state_dict()) == list(ref)
    for key, value in back.state_dict().items():
        assert torch.equal(value, ref[key]), key
    with torch.no_grad():
        assert torch.equal(back(images_224), timm_default[0])
    assert tuple(back.pretrained_cfg["mean"]) == tuple(timm_deit3_base.pretrained_cfg["mean"])


FAMILY = ["deit3_small_patch16_224", "deit3_small_patch16_384", "deit3_medium_patch16_224",
          "deit3_base_patch16_384", "deit3_large_patch16_224", "deit3_large_patch16_384",
          "deit3_huge_patch14_224", "vit_base_patch16_224"]


@pytest.mark.parametrize("name", FAMILY)
def test_family_parity(name):
    """Full width, heads, patch and image size of each architecture; depth cut to 2 blocks for time."""
    from hooked_vit import HookedViT

    timm_model = make_timm(name, depth=2)
    model = HookedViT.from_timm(timm_model)
    assert model.cfg.layer_scale == name.startswith("deit3")
    assert model.cfg.no_embed_class == name.startswith("deit3")
    images = torch.randn(1, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():
        ref = timm_model(images)
        assert torch.equal(model(images), ref)
        logits, cache = model.run_with_cache(images)
    torch.testing.assert_close(logits, ref, rtol=0, atol=EXPLICIT_ATOL)
    assert cache["hook_full_embed"].shape == (1, model.cfg.n_ctx, model.cfg.d_model)


def test_every_registered_alias_matches_timm_architecture():
    from hooked_vit.loading import config_from_timm
    from hooked_vit.pretrained import registry

    import timm

    for alias, spec in registry().items():
        if spec.timm_name is None:
            continue
        # The architecture alone: timm's VisionTransformer can skip weight init (on the meta device
        # its init ops cost ~0.5 s a model); Eva (EVA-02, DINOv3) has no such switch.
        vit = timm.models.is_model_in_modules(spec.timm_name, ["vision_transformer", "deit"])
        skip = {"weight_init": "skip"} if vit else {}
        with torch.device("meta"):
            cfg = config_from_timm(timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs, **skip))
        for key, value in spec.extra["architecture"].items():
            assert getattr(cfg, key) == value, (alias, key)
        pretrained_cfg = timm.models.get_pretrained_cfg(spec.hub_name).to_dict()
        for key, value in spec.preprocessing.items():
            expected = pretrained_cfg[key]
            assert (list(expected) if isinstance(expected, tuple) else expected) == value, (alias, key)
