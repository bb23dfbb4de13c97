"""transformer_lens.patching's helpers on images (hooked_vit.patching): positions are CLS + patches,
results have TL's shapes and equal an independent patch-one-activation-at-a-time loop."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens.patching import layer_pos_patch_setter


@pytest.fixture(scope="module")
def setup(tiny):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    clean, corrupted = images[:1], images[1:]
    with torch.no_grad():
        clean_logits, clean_cache = tiny.run_with_cache(clean)
    target = int(clean_logits.argmax())
    return clean, corrupted, clean_cache, lambda logits: logits[0, target]


def _patched(model, corrupted, name, index, source):
    def patch(act, hook):
        act = act.clone()
        act[index] = source[index]
        return act

    with torch.no_grad():
        return model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])


def test_resid_pre_patching_matches_a_loop_over_layers_and_positions(tiny, setup):
    from hooked_vit import patching

    clean, corrupted, clean_cache, metric = setup
    result = patching.get_act_patch_resid_pre(tiny, corrupted, clean_cache, metric)
    assert result.shape == (2, 17)  # [layer, CLS + 16 patches], not the image width
    for layer in range(2):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(17):
            expected = metric(_patched(tiny, corrupted, name, (slice(None), pos), clean_cache[name]))
            torch.testing.assert_close(result[layer, pos], expected, rtol=0, atol=1e-6)
    # Patching every patch token's stream into block 0 is the clean run at block 0's input; CLS is
    # the same token in both runs, so patching it changes nothing.
    torch.testing.assert_close(result[0, 0], metric(tiny(corrupted)), rtol=0, atol=1e-6)


def test_head_patching_by_position_and_over_all_positions(tiny, setup):
    from hooked_vit import patching

    clean, corrupted, clean_cache, metric = setup
    by_pos = patching.get_act_patch_attn_head_out_by_pos(tiny, corrupted, clean_cache, metric)
    assert by_pos.shape == (2, 17, 2)  # [layer, pos, head]
    for layer, pos, head in [(0, 3, 1), (1, 0, 0), (1, 16, 1)]:
        name = f"blocks.{layer}.attn.hook_z"
        expected = metric(_patched(tiny, corrupted, name, (slice(None), pos, head), clean_cache[name]))
        torch.testing.assert_close(by_pos[layer, pos, head], expected, rtol=0, atol=1e-6)
    all_pos = patching.get_act_patch_attn_head_out_all_pos(tiny, corrupted, clean_cache, metric)
    assert all_pos.shape == (2, 2)
    name = "blocks.1.attn.hook_z"
    expected = metric(_patched(tiny, corrupted, name, (slice(None), slice(None), 1), clean_cache[name]))
    torch.testing.assert_close(all_pos[1, 1], expected, rtol=0, atol=1e-6)
    every = patching.get_act_patch_attn_head_all_pos_every(tiny, corrupted, clean_cache, metric)
    assert every.shape == (5, 2, 2)  # output, q, k, v, pattern
    torch.testing.assert_close(every[0], all_pos, rtol=0, atol=0)
    rows = pd.DataFrame({"layer": [1, 1], "pos": [0, 5]})  # TL's explicit index: one result per row
    flat, index_df = patching.generic_activation_patch(
        tiny, corrupted, clean_cache, metric, patch_setter=layer_pos_patch_setter, activation_name="attn_out",
        index_df=rows, return_index_df=True)
    assert flat.shape == (2,) and list(index_df["pos"]) == [0, 5]
    for row, pos in enumerate([0, 5]):
        name = "blocks.1.hook_attn_out"
        expected = metric(_patched(tiny, corrupted, name, (slice(None), pos), clean_cache[name]))
        torch.testing.assert_close(flat[row], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of"):
        patching.generic_activation_patch(tiny, corrupted, clean_cache, metric, patch_setter=layer_pos_patch_setter,
                                          activation_name="z")
    with pytest.raises(ValueError, match="batch size"):  # before any patching run
        patching.get_act_patch_resid_pre(tiny, torch.cat([corrupted, corrupted]), clean_cache, metric)
