"""TransformerLens weight views (re-derived from the cached forward pass), factored matrices,
accumulated bias, class directions, weight processing (logits unchanged, convertible back to
timm) and the TL methods that have no meaning for an image classifier."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

PROCESSING_ATOL = 1e-5  # measured ~1e-6 on deit3_tiny_digits logits of magnitude ~10


@pytest.fixture(scope="module")
def run(tiny):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(images)
    return images, logits, cache


def test_weight_views_reproduce_the_forward_pass(tiny, run):
    images, logits, cache = run
    cfg = tiny.cfg
    assert tiny.W_Q.shape == (2, 2, 32, 16) and tiny.W_O.shape == (2, 2, 16, 32) and tiny.b_V.shape == (2, 2, 16)
    assert tiny.W_in.shape == (2, 32, 128) and tiny.W_out.shape == (2, 128, 32) and tiny.b_out.shape == (2, 32)
    assert tiny.W_U.shape == (32, 1000) and tiny.W_pos.shape == (17, 32) and tiny.W_E.shape == (3 * 8 * 8, 32)
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            x = cache["normalized", layer, "ln1"]
            for name in "qkv":
                W, b = getattr(tiny, f"W_{name.upper()}")[layer], getattr(tiny, f"b_{name.upper()}")[layer]
                expected = torch.einsum("bpd,hde->bphe", x, W) + b
                torch.testing.assert_close(cache[name, layer], expected, rtol=0, atol=1e-5)
            attn_out = torch.einsum("bphe,hem->bpm", cache["z", layer], tiny.W_O[layer]) + tiny.b_O[layer]
            torch.testing.assert_close(attn_out, cache["attn_out", layer], rtol=0, atol=1e-5)
            pre = cache["normalized", layer, "ln2"] @ tiny.W_in[layer] + tiny.b_in[layer]
            torch.testing.assert_close(pre, cache["pre", layer], rtol=0, atol=1e-5)
            mlp_out = cache["post", layer] @ tiny.W_out[layer] + tiny.b_out[layer]
            torch.testing.assert_close(mlp_out, cache["mlp_out", layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(cache["hook_pooled"] @ tiny.W_U + tiny.b_U, logits, rtol=0, atol=1e-5)
        # TL's module-level names: model.unembed.W_U / b_U are the head's, as model.W_U / b_U.
        assert torch.equal(tiny.unembed.W_U, tiny.head.weight.T) and torch.equal(tiny.unembed.b_U, tiny.head.bias)
        assert torch.equal(cache["hook_pos_embed"][0], tiny.W_pos) and not tiny.W_pos[0].any()
        # W_E on each patch's pixels flattened (channel, row, column), plus the conv bias.
        patches = F.unfold(images, kernel_size=8, stride=8).transpose(1, 2)  # [batch, n_patches, 3*8*8]
        expected = patches @ tiny.W_E + tiny.patch_embed.proj.bias
        torch.testing.assert_close(expected, cache["hook_embed"][:, 1:], rtol=0, atol=1e-5)


def test_factored_matrices_accumulated_bias_and_class_directions(tiny):
    from transformer_lens.FactoredMatrix import FactoredMatrix

    with torch.no_grad():
        assert isinstance(tiny.OV, FactoredMatrix) and isinstance(tiny.QK, FactoredMatrix)
        torch.testing.assert_close(tiny.OV.AB, tiny.W_V @ tiny.W_O)
        torch.testing.assert_close(tiny.QK.AB, tiny.W_Q @ tiny.W_K.transpose(-2, -1))
        # TL's FactoredMatrix methods work on it: an OV circuit has rank d_head.
        singular_values = tiny.OV[1, 0].S
        assert singular_values.shape == (16,) and singular_values.min() > 1e-6
        torch.testing.assert_close(tiny.OV[1, 0].norm(), torch.linalg.matrix_norm(tiny.W_V[1, 0] @ tiny.W_O[1, 0]))
        # accumulated_bias: independent loop over the timm parameters, LayerScale included.
        blocks = tiny.blocks
        attn_bias = [b.attn.proj.bias * b.ls1.gamma for b in blocks]
        mlp_bias = [b.mlp.fc2.bias * b.ls2.gamma for b in blocks]
        torch.testing.assert_close(tiny.accumulated_bias(2), sum(attn_bias) + sum(mlp_bias))
        torch.testing.assert_close(tiny.accumulated_bias(1, mlp_input=True), attn_bias[0] + mlp_bias[0] + attn_bias[1])
        torch.testing.assert_close(tiny.accumulated_bias(2, include_mlp_biases=False), sum(attn_bias))
        assert torch.equal(tiny.class_residual_directions(7), tiny.W_U[:, 7])
        assert torch.equal(tiny.class_residual_directions([7, "3"]), tiny.W_U[:, [7, 3]].T)
        assert torch.equal(tiny.tokens_to_residual_directions(torch.tensor([[1, 2]])), tiny.W_U[:, [[1, 2]]].movedim(0, -1))
    assert tiny.all_head_labels() == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert tiny.all_composition_scores("Q").shape == (2, 2, 2, 2)
    assert tiny.to_str_tokens()[:3] == ["CLS", "r0c0", "r0c1"] and len(tiny.to_str_tokens()) == 17
    with pytest.raises(ValueError, match="not a class of this model"):
        tiny.to_single_token("cat")
    with pytest.raises(ValueError, match=r"class indices must be in 0\.\.999"):
        tiny.class_residual_directions([3, 1000])


def test_tl_config_fields_and_device(tiny):
    cfg = tiny.cfg
    assert (cfg.normalization_type, cfg.attn_only, cfg.positional_embedding_type, cfg.device) == ("LN", False,
                                                                                                "standard", "cpu")
    assert cfg.d_vocab == cfg.d_vocab_out == 1000
    assert "device" not in cfg.to_dict()  # where a model lives is not part of what it is


def test_tl_config_eps_and_dtype(tiny):
    """A TL notebook reads cfg.eps and cfg.dtype; ln_eps stays as the project's name of the same value."""
    import copy

    cfg = tiny.cfg
    assert cfg.eps == cfg.ln_eps == tiny.blocks[0].ln1.eps == 1e-6
    assert cfg.dtype == torch.float32 and "dtype" not in cfg.to_dict() and "ln_eps" in cfg.to_dict()
    half = copy.deepcopy(tiny).to(torch.float64)
    assert half.cfg.dtype == torch.float64 and tiny.cfg.dtype == torch.float32
    other = copy.deepcopy(cfg)
    other.eps = 1e-5
    assert other.ln_eps == 1e-5


def test_methods_without_meaning_raise_naming_the_alternative(tiny):
    for call, alternative in [(lambda: tiny.to_tokens("a cat"), "image batch"),
                              (lambda: tiny.generate(torch.zeros(1, 3, 32, 32)), r"model\(images\)"),
                              (lambda: tiny.to_string([1]), "to_single_str_token"),
                              (lambda: tiny.to_str_tokens("a cat"), "image batch")]:
        with pytest.raises(NotImplementedError, match=alternative):
            call()


@pytest.fixture(scope="module")
def digits():
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset

    model = HookedViT.from_pretrained("deit3_tiny_digits")
    data = load_dataset("digits", "val", model=model)
    images = torch.stack([data[i][0] for i in range(4)])
    with torch.no_grad():
        return model, images, model(images)


NO_PROCESSING = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)


@pytest.mark.parametrize("flags", [
    dict(fold_layer_scale=True), dict(fold_ln=True), dict(center_writing_weights=True),
    dict(fold_value_biases=True), dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True),
    dict(refactor_factored_attn_matrices=True),
], ids=lambda f: "+".join(f))
def test_weight_processing_leaves_logits_unchanged_and_converts_to_timm(digits, flags):
    model, images, reference = digits
    processed = copy.deepcopy(model)
    processed.process_weights_(**{**NO_PROCESSING, **flags})
    with torch.no_grad():
        logits = processed(images)
        torch.testing.assert_close(logits, reference, rtol=0, atol=PROCESSING_ATOL)
        assert torch.equal(processed.to_timm()(images), logits)  # still an ordinary timm model
    for block in processed.blocks:  # LayerScale is folded by every flag
        assert torch.all(block.ls1.gamma == 1) and torch.all(block.ls2.gamma == 1)
    if flags.get("fold_ln"):
        assert processed.cfg.normalization_type == "LNPre"
        assert torch.all(processed.blocks[1].ln1.w == 1) and not processed.ln_final.b.any()
    if flags.get("center_writing_weights"):
        for writes in (processed.W_O, processed.W_out, processed.W_pos, processed.W_E, processed.b_out):
            assert writes.mean(-1).abs().max() < 1e-6
    if flags.get("fold_value_biases"):
        assert not processed.b_V.any()
    if flags.get("refactor_factored_attn_matrices"):  # TL: W_O a rotation, b_V folded, QK and OV kept
        W_O = processed.W_O  # [layer, head, d_head, d_model]
        eye = torch.eye(W_O.shape[-2]).expand(*W_O.shape[:2], -1, -1)
        torch.testing.assert_close(W_O @ W_O.transpose(-1, -2), eye, rtol=0, atol=1e-5)
        assert not processed.b_V.any()
        with torch.no_grad():
            folded = copy.deepcopy(model)
            folded.process_weights_(**NO_PROCESSING, fold_layer_scale=True)
            torch.testing.assert_close(processed.OV.AB, folded.OV.AB, rtol=0, atol=1e-5)
            torch.testing.assert_close(processed.QK.AB, folded.QK.AB, rtol=0, atol=1e-5)


def test_from_pretrained_processing_flags_and_save_round_trip(digits, tmp_path):
    from hooked_vit import HookedViT

    model, images, _ = digits
    flags = dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    processed = HookedViT.from_pretrained("deit3_tiny_digits", **flags)
    by_method = copy.deepcopy(model)
    by_method.process_weights_(**{**NO_PROCESSING, **flags})
    for (name, value), (_, expected) in zip(processed.state_dict().items(), by_method.state_dict().items()):
        assert torch.equal(value, expected), name
    again = HookedViT.from_pretrained(processed.save_pretrained(tmp_path / "processed"))
    assert again.cfg.normalization_type == "LNPre"
    with torch.no_grad():
        assert torch.equal(again(images), processed(images))
    plain = HookedViT.from_pretrained_no_processing("deit3_tiny_digits")
    assert plain.cfg.normalization_type == "LN" and torch.equal(plain.blocks[0].ls1.gamma, model.blocks[0].ls1.gamma)


def test_center_unembed_keeps_probabilities(digits):
    model, images, reference = digits
    centered = copy.deepcopy(model)
    centered.process_weights_(**{**NO_PROCESSING, "center_unembed": True})
    with torch.no_grad():
        logits = centered(images)
        torch.testing.assert_close(logits.log_softmax(-1), reference.log_softmax(-1), rtol=0, atol=1e-5)
        assert logits.mean(-1).abs().max() < 1e-5 and reference.mean(-1).abs().max() > 1e-2


def test_processing_flags_are_checked_before_loading():
    from hooked_vit import HookedViT

    with pytest.raises(ValueError, match="leave fold_layer_scale unset"):
        HookedViT.from_pretrained("deit3_tiny_digits", fold_ln=True, fold_layer_scale=False)
    with pytest.raises(ValueError, match="fill in pruned"):
        HookedViT.from_pretrained("deit3_tiny_digits", sparsity=0.5, fold_ln=True)


def test_processing_a_pruned_model_keeps_it_pruned(digits):
    """On a pruned model, LayerScale folding, fold_value_biases and center_unembed keep every masked
    weight at zero and the masks in place; steps that would fill masked weights in are refused."""
    from hooked_vit.pruning.masks import MASK_NAME, masked_linears, set_mask

    model, images, reference = digits
    pruned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(13)
    for block in pruned.blocks:
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            set_mask(linear, torch.rand(linear.weight.shape, generator=generator) > 0.5)
    with torch.no_grad():
        pruned_logits = pruned(images)
    masks = {name: getattr(m, MASK_NAME).clone() for name, m in masked_linears(pruned).items()}
    pruned.process_weights_(fold_ln=False, center_writing_weights=False, center_unembed=True,
                            fold_value_biases=True)
    assert {name: getattr(m, MASK_NAME) for name, m in masked_linears(pruned).items()}.keys() == masks.keys()
    for name, linear in masked_linears(pruned).items():
        assert torch.equal(getattr(linear, MASK_NAME), masks[name]), name
        assert not linear.weight[~masks[name]].any(), name
    assert torch.all(pruned.blocks[0].ls1.gamma == 1) and not pruned.b_V.any()
    with torch.no_grad():
        torch.testing.assert_close(pruned(images).log_softmax(-1), pruned_logits.log_softmax(-1), rtol=0,
                                   atol=PROCESSING_ATOL)
    before = copy.deepcopy(pruned.state_dict())
    for flag in ("fold_ln", "center_writing_weights", "refactor_factored_attn_matrices"):
        with pytest.raises(ValueError, match="fill in pruned"):
            pruned.process_weights_(**{**NO_PROCESSING, flag: True})
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # refused before any work


def test_fold_ln_without_qkv_bias_is_refused_before_any_work():
    from hooked_vit import HookedViT, HookedViTConfig

    model = HookedViT(HookedViTConfig(img_size=16, patch_size=8, in_chans=3, d_model=16, n_layers=1, n_heads=2,
                                      d_mlp=32, n_classes=5, qkv_bias=False))
    with torch.no_grad():
        model.blocks[0].ls1.gamma.fill_(0.5)
    with pytest.raises(ValueError, match="no q/k/v bias"):
        model.process_weights_()
    assert torch.all(model.blocks[0].ls1.gamma == 0.5)


STEP_FLAGS = {"fold_layer_norm": "fold_ln", "center_writing_weights": "center_writing_weights",
              "center_unembed": "center_unembed", "fold_value_biases": "fold_value_biases"}


@pytest.mark.parametrize("method", list(STEP_FLAGS))
def test_state_dict_processing_methods_match_the_from_pretrained_flags(digits, method):
    """TL's ``model.fold_layer_norm(state_dict)`` etc.: a new state dict (the input and the model
    untouched) with exactly the weights ``from_pretrained(<flag>=True)`` loads."""
    from hooked_vit import HookedViT

    model, images, reference = digits
    before = copy.deepcopy(model.state_dict())
    state_dict = model.state_dict()
    processed = getattr(model, method)(state_dict)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed in place
    expected = HookedViT.from_pretrained("deit3_tiny_digits", **{STEP_FLAGS[method]: True}).state_dict()
    assert processed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(processed[name], value), name
    loaded = copy.deepcopy(model)
    loaded.load_state_dict(processed)
    with torch.no_grad():
        logits = loaded(images)
    if method == "center_unembed":
        torch.testing.assert_close(logits.log_softmax(-1), reference.log_softmax(-1), rtol=0, atol=PROCESSING_ATOL)
    else:
        torch.testing.assert_close(logits, reference, rtol=0, atol=PROCESSING_ATOL)


def test_chained_state_dict_methods_equal_process_weights(digits):
    """TL's process_weights_ order (fold_ln, center_writing_weights, center_unembed,
    fold_value_biases) as four method calls gives the weights of process_weights_ (each step
    round-trips through the timm layout: equal to fp32 rounding, measured ~1e-11)."""
    model = digits[0]
    chained = model.fold_value_biases(model.center_unembed(model.center_writing_weights(
        model.fold_layer_norm(model.state_dict()))))
    in_place = copy.deepcopy(model)
    in_place.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True,
                              fold_value_biases=True)
    assert in_place.cfg.normalization_type == "LNPre" and model.cfg.normalization_type == "LN"
    for name, value in in_place.state_dict().items():
        torch.testing.assert_close(chained[name], value, rtol=0, atol=1e-6, msg=name)
    assert not in_place.b_V.any() and torch.all(in_place.ln_final.w == 1)


def test_state_dict_methods_refuse_as_process_weights_does(digits):
    from hooked_vit.errors import CheckpointMismatchError, InvalidArgumentError
    from hooked_vit.pruning.masks import set_mask

    model, _, _ = digits
    pruned = copy.deepcopy(model)
    linear = pruned.blocks[0].mlp.fc1
    set_mask(linear, torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    state_dict = pruned.state_dict()
    for method in ("fold_layer_norm", "center_writing_weights", "refactor_factored_attn_matrices"):
        with pytest.raises(InvalidArgumentError, match="fill in pruned"):
            getattr(pruned, method)(state_dict)
    kept = pruned.fold_value_biases(state_dict)  # allowed: pruned weights stay zero, masks kept
    assert torch.equal(kept["blocks.0.mlp.fc1.weight_mask"], linear.weight_mask)
    assert not kept["blocks.0.mlp.fc1.weight"][~linear.weight_mask].any()
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        model.fold_layer_norm({k: v for k, v in model.state_dict().items() if k != "head.bias"})
    with pytest.raises(InvalidArgumentError, match="RMSNorm"):
        model.fold_layer_norm(model.state_dict(), fold_biases=False)
