"""TransformerLens's optional inputs: ``set_use_split_qkv_input`` (``hook_q_input``/``hook_k_input``/
``hook_v_input``), ``set_use_attn_in`` (``hook_attn_in``) and ``set_use_hook_mlp_in``
(``hook_mlp_in``): shapes, equality to the unsplit forward, and one head's query/key/value input
patched, checked against the unsplit model with that head's q/k/v recomputed independently.

Tolerance: the per-head path computes q/k/v with an einsum instead of the fused qkv matmul, so
values agree with the unsplit forward to fp32 rounding; 1e-5 absolute on activations of size ~1-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

ATOL = 1e-5
FLAGS = ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


@pytest.fixture
def split(tiny):
    """A copy of ``tiny`` with every optional input hook on (``tiny`` itself stays unsplit)."""
    model = copy.deepcopy(tiny)
    for flag in FLAGS:
        getattr(model, f"set_{flag}")(True)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(21))


def _ln1(block, x):
    """ln1 of ``x`` recomputed from its parameters (independent of the model's LayerNorm module)."""
    return F.layer_norm(x, x.shape[-1:], block.ln1.weight, block.ln1.bias, block.ln1.eps)


def _head_qkv(block, x, which, head):
    """q (0), k (1) or v (2) of one head from the fused timm qkv parameters: ``[batch, pos, d_head]``."""
    d_head = block.attn.d_head
    rows = slice(which * block.attn.n_heads * d_head + head * d_head, which * block.attn.n_heads * d_head
                 + (head + 1) * d_head)
    return x @ block.attn.qkv.weight[rows].T + block.attn.qkv.bias[rows]


def test_split_inputs_have_tl_shapes_and_equal_the_unsplit_forward(tiny, split, images):
    with torch.no_grad():
        ref_logits, ref = tiny.run_with_cache(images)
        logits, cache = split.run_with_cache(images)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    n_heads, d_model = tiny.cfg.n_heads, tiny.cfg.d_model
    for layer in range(tiny.cfg.n_layers):
        resid_pre = ref["resid_pre", layer]
        for name in ("attn_in", "q_input", "k_input", "v_input"):
            act = cache[f"blocks.{layer}.hook_{name}"]
            assert act.shape == (2, 17, n_heads, d_model), name
            torch.testing.assert_close(act, resid_pre[:, :, None].expand_as(act), rtol=0, atol=ATOL)
        assert cache[f"blocks.{layer}.ln1.hook_normalized"].shape == (2, 17, n_heads, d_model)  # ln1 per head, as TL
        assert cache[f"blocks.{layer}.ln1.hook_scale"].shape == (2, 17, n_heads, 1)
        for head in range(n_heads):
            torch.testing.assert_close(cache[f"blocks.{layer}.ln1.hook_normalized"][:, :, head], ref["normalized", layer, "ln1"],
                                       rtol=0, atol=ATOL)
        assert cache[f"blocks.{layer}.hook_mlp_in"].shape == (2, 17, d_model)
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_in"], ref["resid_mid", layer], rtol=0, atol=ATOL)
        for name in ("q", "k", "v", "pattern", "z", "attn_out", "resid_post"):
            torch.testing.assert_close(cache[name, layer], ref[name, layer], rtol=0, atol=ATOL, msg=name)


def test_gradients_through_the_split_inputs_equal_the_unsplit_ones(tiny, split, images):
    grads = []
    for model in (tiny, split):
        x = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x)[:, 3].sum(), x)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q_input", "k_input", "v_input"])
def test_patching_one_heads_input_changes_only_that_heads_q_k_or_v(tiny, split, images, which):
    """Path patching: head 1's query (key, value) input at block 1 from another image. Expected: the
    unsplit model with only that head's q (k, v) replaced by one recomputed from the other image's
    resid_pre through ln1 and the fused qkv weight."""
    layer, head, name = 1, 1, ("q", "k", "v")[which]
    other = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        _, other_cache = tiny.run_with_cache(other, names_filter=f"blocks.{layer}.hook_resid_pre")
        donor = other_cache["resid_pre", layer]  # [batch, pos, d_model]

        def patch_input(act, hook):  # in place: this head's slice only
            act[:, :, head] = donor

        def patch_head(act, hook):  # the unsplit model: this head's q/k/v, recomputed independently
            act = act.clone()
            act[:, :, head] = _head_qkv(block, _ln1(block, donor), which, head)
            return act

        block = tiny.blocks[layer]
        names = [f"blocks.{layer}.attn.hook_{n}" for n in "qkv"]
        logits, cache = split.run_with_cache(images, names_filter=names)
        patched_cache = {}
        patched = split.run_with_hooks(images, fwd_hooks=[(f"blocks.{layer}.hook_{name}_input", patch_input)]
                                       + [(n, lambda act, hook: patched_cache.__setitem__(hook.name, act.clone()))
                                          for n in names])
        expected = tiny.run_with_hooks(images, fwd_hooks=[(f"blocks.{layer}.attn.hook_{name}", patch_head)])
    assert (patched - logits).abs().max() > 1e-3  # the patch did something
    torch.testing.assert_close(patched, expected, rtol=0, atol=ATOL)
    for n in names:  # the other two of q, k, v and the other heads are untouched
        changed = n.endswith(name)
        for h in range(tiny.cfg.n_heads):
            same = torch.equal(patched_cache[n][:, :, h], cache[n][:, :, h])
            assert same != (changed and h == head), (n, h)


def test_attn_in_edit_reaches_every_input_of_that_head(tiny, split, images):
    """An edit of hook_attn_in at head 0 is seen by head 0's q, k and v (split inputs are copies of
    it), and equals the unsplit model with head 0's q, k, v recomputed from the edited stream."""
    layer, head = 0, 0
    delta = torch.randn(2, 17, tiny.cfg.d_model, generator=torch.Generator().manual_seed(23))
    block = tiny.blocks[layer]
    with torch.no_grad():
        _, ref = tiny.run_with_cache(images, names_filter=f"blocks.{layer}.hook_resid_pre")
        edited = _ln1(block, ref["resid_pre", layer] + delta)

        def edit(act, hook):
            act[:, :, head] += delta

        def recompute(which):
            def hook(act, hook):
                act = act.clone()
                act[:, :, head] = _head_qkv(block, edited, which, head)
                return act
            return hook

        patched = split.run_with_hooks(images, fwd_hooks=[(f"blocks.{layer}.hook_attn_in", edit)])
        expected = tiny.run_with_hooks(images, fwd_hooks=[(f"blocks.{layer}.attn.hook_{n}", recompute(i))
                                                          for i, n in enumerate("qkv")])
    assert (patched - tiny(images)).abs().max() > 1e-3
    torch.testing.assert_close(patched, expected, rtol=0, atol=ATOL)


def test_mlp_in_edit_changes_only_the_mlp_input(tiny, split, images):
    """+delta at hook_mlp_in (in place) changes the MLP's input but not the residual stream it is
    added to: the unsplit model with ln2's output recomputed from resid_mid + delta."""
    layer = 1
    delta = torch.randn(2, 17, tiny.cfg.d_model, generator=torch.Generator().manual_seed(24))
    ln2 = tiny.blocks[layer].ln2
    with torch.no_grad():
        patched = split.run_with_hooks(images, fwd_hooks=[(f"blocks.{layer}.hook_mlp_in",
                                                           lambda act, hook: act.add_(delta))])
        _, ref = tiny.run_with_cache(images, names_filter=f"blocks.{layer}.hook_resid_mid")
        normalized = F.layer_norm(ref["resid_mid", layer] + delta, (tiny.cfg.d_model,), ln2.weight, ln2.bias, ln2.eps)
        expected = tiny.run_with_hooks(images, fwd_hooks=[(f"blocks.{layer}.ln2.hook_normalized",
                                                           lambda act, hook: normalized)])
    assert (patched - tiny(images)).abs().max() > 1e-3
    torch.testing.assert_close(patched, expected, rtol=0, atol=ATOL)


def test_split_hooks_exist_only_while_enabled(tiny, split, images):
    from hooked_vit.errors import InvalidArgumentError

    assert "blocks.0.hook_q_input" not in tiny.hook_dict and "blocks.0.hook_q_input" in split.hook_dict
    with pytest.raises(InvalidArgumentError, match=r"set_use_split_qkv_input\(True\)"):
        tiny.run_with_hooks(images, fwd_hooks=[("blocks.0.hook_q_input", lambda act, hook: None)])
    with pytest.raises(InvalidArgumentError, match=r"set_use_hook_mlp_in\(True\)"):
        tiny.run_with_cache(images, names_filter="blocks.1.hook_mlp_in")
    split.add_hook("blocks.0.hook_k_input", lambda act, hook: act.mul_(2.0))
    for flag in FLAGS:
        getattr(split, f"set_{flag}")(False)
    assert list(split.hook_dict) == list(tiny.hook_dict)
    assert not split.blocks[0].hook_k_input.has_hooks()  # hooks on a switched-off point are removed
    with torch.no_grad():
        assert torch.equal(split(images), tiny(images))  # the unsplit forward again, bit for bit
