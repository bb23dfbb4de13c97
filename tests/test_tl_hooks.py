"""TransformerLens hook semantics on HookedViT: in-place edits reach the computation at every hook
(as the equivalent returning hook does), per-head results include LayerScale, and caching options
(remove_batch_dim, pos_slice, return_cache_object, batch slicing) behave as in TL."""

from __future__ import annotations

import torch


def _edit(name: str, act: torch.Tensor) -> torch.Tensor:
    """A fixed edit for hook ``name``: x1.5 on LN scales and patterns, else + 3 * noise (q and k of
    a random-init model barely move the pattern under a per-channel rescale)."""
    if "scale" in name or "pattern" in name:
        return torch.full(act.shape[-1:], 1.5)
    return 3.0 * torch.randn(act.shape, generator=torch.Generator().manual_seed(3))


def _run(model, images, name, hook, grad):
    """Logits, and with ``grad`` the input gradient of one logit, under one hook."""
    images = images.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        logits = model.run_with_hooks(images, fwd_hooks=[(name, hook)])
        if not grad:
            return logits, None
        (image_grad,) = torch.autograd.grad(logits[:, 1].sum(), images)
    return logits.detach(), image_grad


def test_in_place_edits_reach_the_computation_at_every_hook(tiny, grad=True):
    """``act.add_(d)`` in a hook gives the logits and input gradients of ``return act + d`` (with
    autograd on: an in-place edit must neither be lost nor break the backward pass)."""
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tiny.set_use_attn_result(True)
    try:
        clean = tiny(images)
        for name in tiny.hook_dict:
            multiply = "scale" in name or "pattern" in name

            def in_place(act, hook):  # returns None: the edit must act through the tensor itself
                act.mul_(_edit(hook.name, act)) if multiply else act.add_(_edit(hook.name, act))

            def returning(act, hook):
                return act * _edit(hook.name, act) if multiply else act + _edit(hook.name, act)

            logits, grads = _run(tiny, images, name, in_place, grad)
            ref_logits, ref_grads = _run(tiny, images, name, returning, grad)
            assert (logits - clean).abs().max() > 1e-5, name  # the edit did something
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6, msg=name)
            if grad:
                torch.testing.assert_close(grads, ref_grads, rtol=0, atol=1e-6, msg=name)
    finally:
        tiny.set_use_attn_result(False)


def test_partial_in_place_edit_of_one_head_and_one_position(tiny):
    """The issue's example, an indexed assignment at hook_q/k/v and hook_pos_embed: ``act[:, 1, 0] =
    10`` (one token's head 0, or channel 0; 10 rather than 0, which barely moves a random-init
    model's near-uniform attention)."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    clean = tiny(images)

    def assign_in_place(act, hook):
        act[:, 1, 0] = 10.0

    def assign_returning(act, hook):
        act = act.clone()
        act[:, 1, 0] = 10.0
        return act

    for name in ("blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.1.attn.hook_v", "hook_pos_embed"):
        edited = tiny.run_with_hooks(images, fwd_hooks=[(name, assign_in_place)])
        expected = tiny.run_with_hooks(images, fwd_hooks=[(name, assign_returning)])
        assert (edited - clean).abs().max() > 1e-5, name
        torch.testing.assert_close(edited, expected, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(tiny(images), clean)  # nothing leaked into the weights


def test_head_results_include_layer_scale_and_sum_with_b_O_to_attn_out(tiny):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    tiny.set_use_attn_result(True)
    try:
        logits, cache = tiny.run_with_cache(images)
    finally:
        tiny.set_use_attn_result(False)
    torch.testing.assert_close(logits, tiny(images), rtol=0, atol=1e-5)
    for layer, block in enumerate(tiny.blocks):
        gamma = block.ls1.gamma
        assert not torch.allclose(gamma, torch.ones_like(gamma))
        result = cache["result", layer]  # [batch, pos, head, d_model]
        # Independent: head h's slice of z through proj's columns, then LayerScale.
        z = cache["z", layer]
        d_head = tiny.cfg.d_head
        expected = torch.stack([z[:, :, h] @ block.attn.proj.weight[:, h * d_head:(h + 1) * d_head].T * gamma
                                for h in range(tiny.cfg.n_heads)], dim=2)
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.sum(2) + block.attn.proj.bias * gamma, cache["attn_out", layer],
                                   rtol=0, atol=1e-5)


def test_remove_batch_dim_pos_slice_and_return_cache_object(tiny):
    from hooked_vit import ViTActivationCache

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    _, single = tiny.run_with_cache(images[:1], remove_batch_dim=True)
    assert not single.has_batch_dim
    assert single["hook_pooled"].shape == (32,)
    assert single["blocks.1.hook_resid_post"].shape == (17, 32)
    assert single["blocks.1.attn.hook_q"].shape == (17, 2, 16)

    _, full = tiny.run_with_cache(images)
    _, at_cls = tiny.run_with_cache(images, pos_slice=0)
    assert torch.equal(at_cls["hook_pooled"], full["hook_pooled"])  # no position axis: left whole
    assert torch.equal(at_cls["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"][:, :1])
    assert torch.equal(at_cls["blocks.0.attn.hook_z"], full["blocks.0.attn.hook_z"][:, :1])

    _, grads = tiny.run_with_cache(images[:1], remove_batch_dim=True, incl_bwd=True,
                                   names_filter=["hook_pooled"], metric=lambda out: out[0, 2])
    torch.testing.assert_close(grads["hook_pooled_grad"], tiny.head.weight[2])
    tiny.zero_grad(set_to_none=True)

    _, as_dict = tiny.run_with_cache(images, return_cache_object=False, names_filter="hook_pooled")
    assert type(as_dict) is dict  # fast path here, explicit path (all hooks cached) in ``full``
    torch.testing.assert_close(as_dict["hook_pooled"], full["hook_pooled"], rtol=0, atol=1e-5)

    sliced = full.apply_slice_to_batch_dim(slice(1, 3))
    assert isinstance(sliced, ViTActivationCache) and sliced.has_batch_dim
    assert torch.equal(sliced.cls_token("blocks.1.hook_resid_post"), full["blocks.1.hook_resid_post"][1:3, 0])
    one = full.apply_slice_to_batch_dim(2)
    assert isinstance(one, ViTActivationCache) and not one.has_batch_dim
    assert torch.equal(one["hook_pooled"], full["hook_pooled"][2])
    assert one.patch_grid("blocks.0.hook_resid_post").shape == (1, 4, 4, 32)
    first = tiny.run_with_cache(images[:1])[1].remove_batch_dim()
    assert isinstance(first, ViTActivationCache) and first["hook_pooled"].shape == (32,)


def test_caching_hooks_only_read_so_the_cache_skips_copies_and_changes_no_value(tiny):
    """run_with_cache's hooks are marked read-only, so LN scales, patterns and z are not copied for
    them; every cached value and the logits equal those captured by ordinary (copying) hooks."""
    from hooked_vit.components import may_edit

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(31))
    pattern = tiny.blocks[0].attn.hook_pattern
    _, fwd, _ = tiny.get_caching_hooks(names_filter=["blocks.0.attn.hook_pattern"])
    with tiny.hooks(fwd_hooks=fwd):
        assert pattern.has_hooks() and not may_edit(pattern)
    with tiny.hooks(fwd_hooks=fwd + [("blocks.0.attn.hook_pattern", lambda act, hook: None)]):
        assert may_edit(pattern)  # an unmarked hook might edit in place: the value gets its own copy
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(images)
        captured = {}
        copied_logits = tiny.run_with_hooks(images, fwd_hooks=[(lambda name: True, lambda act, hook: captured.
                                                                 __setitem__(hook.name, act.clone()))])
    assert torch.equal(logits, copied_logits)
    assert captured.keys() == cache.keys()
    for name, value in captured.items():
        assert torch.equal(cache[name], value), name
