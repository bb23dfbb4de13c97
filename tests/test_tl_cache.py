"""TransformerLens's ActivationCache analysis methods on the embedded deit3_tiny_digits, checked
against TL's identities and independent re-derivations (loops over heads / neurons / layers).

Tolerances: sums of 10-1500 fp32 components of magnitude <= ~30 agree to 1e-4 absolute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

ATOL = 1e-4


@pytest.fixture(scope="module")
def digits():
    """(model, folded model (fold_ln, LayerScale folded), 4 validation images, their labels)."""
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset

    model = HookedViT.from_pretrained("deit3_tiny_digits")
    folded = HookedViT.from_pretrained("deit3_tiny_digits", fold_ln=True)
    data = load_dataset("digits", "val", model=model)
    images = torch.stack([data[i][0] for i in range(4)])
    labels = torch.tensor([data[i][1] for i in range(4)])
    return model, folded, images, labels


@pytest.fixture(scope="module")
def run(digits):
    model, _, images, _ = digits
    with torch.no_grad():
        return model.run_with_cache(images)


def test_decompose_resid_sums_to_the_residual_stream(digits, run):
    model, _, _, _ = digits
    _, cache = run
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels[:4] == ["embed", "pos_embed", "0_attn_out", "0_mlp_out"] and len(labels) == 2 + 2 * 4
    torch.testing.assert_close(stack.sum(0), cache["resid_post", -1], rtol=0, atol=ATOL)
    mid, mid_labels = cache.decompose_resid(layer=2, mlp_input=True, return_labels=True)
    assert mid_labels[-1] == "2_attn_out"
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 2], rtol=0, atol=ATOL)
    attn_only = cache.decompose_resid(mode="attn", incl_embeds=False, pos_slice=0)
    assert attn_only.shape == (4, 4, model.cfg.d_model)  # [layer, batch, d_model] at CLS


def test_logit_attrs_of_the_decomposition_sum_to_logit_minus_bias(digits):
    """TL's identity (with fold_ln, which folds ln_final's weight into W_U and its bias into b_U):
    the attributions of all components at CLS sum to each class logit minus b_U."""
    _, folded, images, labels = digits
    with torch.no_grad():
        logits, cache = folded.run_with_cache(images)
        target = logits.gather(1, labels[:, None])[:, 0] - folded.b_U[labels]
        stack = cache.decompose_resid(pos_slice=0)  # [component, batch, d_model]
        attrs = cache.logit_attrs(stack, tokens=labels, pos_slice=0)
        assert attrs.shape == (stack.shape[0], 4)
        torch.testing.assert_close(attrs.sum(0), target, rtol=0, atol=ATOL)
        full, names = cache.get_full_resid_decomposition(pos_slice=0, expand_neurons=True, return_labels=True)
        assert names[:2] == ["L0H0", "L0H1"] and names[-3:] == ["embed", "pos_embed", "bias"]
        torch.testing.assert_close(cache.logit_attrs(full, tokens=labels, pos_slice=0).sum(0), target,
                                   rtol=0, atol=ATOL)
        # A class name (digits are named "0".."9") and a logit difference.
        by_name = cache.logit_attrs(stack, tokens="3", pos_slice=0).sum(0)
        torch.testing.assert_close(by_name, logits[:, 3] - folded.b_U[3], rtol=0, atol=ATOL)
        diff = cache.logit_attrs(stack, tokens=labels, incorrect_tokens=(labels + 1) % 10, pos_slice=0).sum(0)
        expected = target - (logits.gather(1, ((labels + 1) % 10)[:, None])[:, 0] - folded.b_U[(labels + 1) % 10])
        torch.testing.assert_close(diff, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "fold_ln"])
def test_logit_attrs_sum_to_the_logit_difference_without_fold_ln(digits, folded):
    """TL's identity on the default (unfolded, timm-equal) model too: the attributions of the full
    residual decomposition at CLS sum to the logit difference minus the head's bias difference and
    the final LayerNorm bias's share, ln_final.b @ (W_U[:, c] - W_U[:, c']) (zero after fold_ln).
    Each attribution is re-derived: the centred component over the cached final scale, dotted with
    the head's row times the final LayerNorm's weight."""
    model = digits[1] if folded else digits[0]
    images, labels = digits[2], digits[3]
    wrong = (labels + 1) % 10
    head_w, head_b = model.head.weight, model.head.bias  # [n_classes, d_model], [n_classes]
    ln_w, ln_b = model.ln_final.weight, model.ln_final.bias
    if not folded:  # the default model's final LayerNorm is far from the identity: the test can fail
        assert (ln_w - 1).abs().max() > 0.1 and ln_b.abs().max() > 0.01
    with torch.no_grad():
        logits, cache = model.run_with_cache(images)
        full = cache.get_full_resid_decomposition(pos_slice=0, expand_neurons=True)  # [component, batch, d_model]
        attrs = cache.logit_attrs(full, tokens=labels, incorrect_tokens=wrong, pos_slice=0)
        assert attrs.shape == (full.shape[0], 4)
        bias_share = head_b[labels] - head_b[wrong] + ((head_w[labels] - head_w[wrong]) * ln_b).sum(-1)
        target = logits.gather(1, labels[:, None])[:, 0] - logits.gather(1, wrong[:, None])[:, 0] - bias_share
        torch.testing.assert_close(attrs.sum(0), target, rtol=0, atol=ATOL)
        scale = cache["ln_final.hook_scale"][:, 0]  # [batch, 1] at CLS
        for component in (0, full.shape[0] // 2, full.shape[0] - 1):
            centred = full[component] - full[component].mean(-1, keepdim=True)
            expected = (centred / scale * ln_w * (head_w[labels] - head_w[wrong])).sum(-1)
            torch.testing.assert_close(attrs[component], expected, rtol=0, atol=1e-5)
        single = cache.logit_attrs(full, tokens=7, pos_slice=0).sum(0)
        torch.testing.assert_close(single, logits[:, 7] - head_b[7] - head_w[7] @ ln_b, rtol=0, atol=ATOL)
        assert model.tokens_to_residual_directions(7).shape == (model.cfg.d_model,)
        torch.testing.assert_close(model.tokens_to_residual_directions(labels), head_w[labels] * ln_w,
                                   rtol=0, atol=0)


def test_accumulated_resid_and_apply_ln_to_stack(digits, run):
    model, _, _, _ = digits
    logits, cache = run
    acc, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "3_pre", "final_post"]
    ln = model.ln_final
    for i, layer in enumerate(range(4)):  # logit lens: ln_final recomputed on each stream
        expected = F.layer_norm(cache["resid_pre", layer], (model.cfg.d_model,), ln.weight, ln.bias, ln.eps)
        torch.testing.assert_close(acc[i], expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.unembed(acc[-1][:, 0]), logits, rtol=0, atol=1e-5)
    stack = cache.decompose_resid()
    scaled = cache.apply_ln_to_stack(stack)  # cached final scale, centered, no weight/bias (TL)
    expected = (stack - stack.mean(-1, keepdim=True)) / cache["ln_final.hook_scale"]
    torch.testing.assert_close(scaled, expected, rtol=0, atol=1e-6)


def test_head_and_neuron_results_rebuild_the_stream(digits, run):
    model, _, images, _ = digits
    _, cache = run
    cache = cache.apply_slice_to_batch_dim(slice(0, 2))  # a copy: compute_head_results adds keys
    heads, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] and labels[-1] == "remainder"
    torch.testing.assert_close(heads.sum(0), cache["resid_post", -1], rtol=0, atol=ATOL)
    # compute_head_results (z @ W_O, LayerScale folded) equals the model's own per-head results.
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, with_results = model.run_with_cache(images[:2], names_filter=lambda n: n.endswith("hook_result"))
    finally:
        model.set_use_attn_result(False)
    for layer in range(4):
        torch.testing.assert_close(cache["result", layer], with_results["result", layer], rtol=0, atol=1e-5)
    # Neurons: independent loop over layers, post[n] * fc2 column n * LayerScale.
    neurons, neuron_labels = cache.stack_neuron_results(layer=4, pos_slice=0, return_labels=True)
    assert neurons.shape == (4 * 384, 2, 96) and neuron_labels[385] == "L1N1"
    for layer, block in enumerate(model.blocks):
        post = cache["post", layer][:, 0]  # [batch, d_mlp] at CLS
        expected = post[..., None] * (block.mlp.fc2.weight.T * block.ls2.gamma)  # [batch, d_mlp, d_model]
        got = cache.get_neuron_results(layer, pos_slice=0)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(neurons[384 * layer:384 * (layer + 1)].transpose(0, 1), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.sum(1) + block.mlp.b_out, cache["mlp_out", layer][:, 0], rtol=0, atol=1e-5)
    full = cache.get_full_resid_decomposition(expand_neurons=True)
    torch.testing.assert_close(full.sum(0), cache["resid_post", -1], rtol=0, atol=ATOL)
    unexpanded = cache.get_full_resid_decomposition(layer=2, mlp_input=True, expand_neurons=False)
    torch.testing.assert_close(unexpanded.sum(0), cache["resid_mid", 2], rtol=0, atol=ATOL)
