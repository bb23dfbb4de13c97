"""Attribution patching (analyses.common.attribution_patching): exact where the metric is linear in the
site (hook_pooled feeds the linear head), the formula against TransformerLens's cached gradients
at a head site, per-image independence, no parameter gradients, and high rank correlation with
exact activation patching on the embedded model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def digits_model():
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained("deit3_tiny_digits")


@pytest.fixture(scope="module")
def digits_val(digits_model):
    from hooked_vit.data import load_dataset

    return load_dataset("digits", split="val", model=digits_model)


@pytest.fixture(scope="module")
def digits_means(digits_model):
    from analyses.common.ablation import compute_means
    from hooked_vit.data import calibration_sample, load_dataset

    train = calibration_sample(load_dataset("digits", split="train", model=digits_model), 300, seed=0)
    return compute_means(digits_model, train, hooks=[digits_model.sites[-1, "mlp_act"].hook_name], show_progress=False)


@pytest.fixture(scope="module")
def pooled_setup(small_hooked, images_64):
    from analyses.common.ablation import compute_means
    from hooked_vit.data import LabelledImages
    from hooked_vit.sites import Site

    site = Site(layer=1, name="pooled", hook_name="hook_pooled", unit="feature", width=small_hooked.cfg.d_model)
    data = LabelledImages.from_tensors(images_64, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    means = compute_means(small_hooked, data, hooks=["hook_pooled", "blocks.0.attn.hook_q", "blocks.1.attn.hook_z"],
                          show_progress=False)
    return site, means


@pytest.mark.parametrize("reference", ["mean", "zero", "corrupted"])
def test_exact_when_the_metric_is_linear_in_the_site(small_hooked, images_64, pooled_setup, reference):
    from analyses.common.attribution_patching import attribution_patching, exact_patching

    site, means = pooled_setup
    targets = torch.tensor([3, 0, 999])  # logit = W[t] . pooled + b: linear in every unit
    corrupted = images_64.flip(0) if reference == "corrupted" else None
    kwargs = dict(targets=targets, reference=reference, means=means, corrupted_images=corrupted)
    estimate = attribution_patching(small_hooked, images_64, [site], **kwargs).estimates["hook_pooled"]
    units = list(range(0, 384, 24))
    exact = exact_patching(small_hooked, images_64, site, units=units, batch_size=48, **kwargs)
    assert estimate.shape == (3, 384) and exact.shape == (3, 16)
    assert exact.abs().max() > 1e-3  # a real change, not zeros on both sides
    torch.testing.assert_close(estimate[:, units], exact, rtol=1e-4, atol=2e-5)
    # The exact value by hand: (a_ref - a) * W[t], per unit.
    _, cache = small_hooked.run_with_cache(images_64, names_filter=["hook_pooled"])
    act = cache["hook_pooled"]
    ref = {"mean": means.mean("hook_pooled"), "zero": torch.zeros(384)}.get(reference)
    if ref is None:
        ref = small_hooked.run_with_cache(corrupted, names_filter=["hook_pooled"])[1]["hook_pooled"]
    torch.testing.assert_close(estimate, (ref - act) * small_hooked.head.weight[targets].detach(),
                               rtol=1e-4, atol=1e-6)


def test_head_units_match_transformer_lens_gradients(small_hooked, images_64, pooled_setup):
    from analyses.common.attribution_patching import attribution_patching

    _, means = pooled_setup
    small_hooked.zero_grad(set_to_none=True)
    targets = torch.tensor([5, 7, 11])
    result = attribution_patching(small_hooked, images_64, [(0, "q"), (1, "attn_head")], targets=targets, means=means)
    # Parameter gradients are neither computed nor left behind.
    assert all(p.grad is None for p in small_hooked.parameters())
    names = ["blocks.0.attn.hook_q", "blocks.1.attn.hook_z"]
    logits, cache = small_hooked.run_with_cache(
        images_64, names_filter=names, incl_bwd=True, metric=lambda out: out.gather(1, targets[:, None]).sum())
    small_hooked.zero_grad(set_to_none=True)
    torch.testing.assert_close(result.logits, logits.detach())
    torch.testing.assert_close(result.metric, logits.detach().gather(1, targets[:, None]).squeeze(1))
    for name in names:
        expected = ((means.mean(name) - cache[name]) * cache[name + "_grad"]).sum(dim=(1, 3))  # pos, d_head
        assert result.estimates[name].shape == (3, 6)
        torch.testing.assert_close(result.estimates[name], expected, rtol=1e-4, atol=1e-6)


def test_per_image_estimates_do_not_depend_on_the_batch(small_hooked, images_64, pooled_setup):
    from analyses.common.attribution_patching import attribution_patching

    _, means = pooled_setup
    site = (1, "attn_head")
    together = attribution_patching(small_hooked, images_64, [site], targets=4, means=means).estimates
    alone = [attribution_patching(small_hooked, images_64[i:i + 1], [site], targets=4, means=means).estimates
             for i in range(3)]
    torch.testing.assert_close(together["blocks.1.attn.hook_z"],
                               torch.cat([a["blocks.1.attn.hook_z"] for a in alone]), rtol=1e-4, atol=1e-6)


def test_argument_errors(small_hooked, images_64, pooled_setup):
    from analyses.common.attribution_patching import attribution_patching, exact_patching

    _, means = pooled_setup
    with pytest.raises(ValueError, match="targets="):
        attribution_patching(small_hooked, images_64, [(1, "attn_head")], means=means)
    with pytest.raises(ValueError, match="corrupted_images"):
        attribution_patching(small_hooked, images_64, [(1, "attn_head")], targets=0, reference="corrupted")
    with pytest.raises(ValueError, match="one value per image"):
        attribution_patching(small_hooked, images_64, [(1, "attn_head")], metric=lambda x: x.sum(), means=means)
    with pytest.raises(ValueError, match="needs means="):
        exact_patching(small_hooked, images_64, (1, "attn_head"), targets=0)
    with pytest.raises(KeyError, match="Unknown site"):
        attribution_patching(small_hooked, images_64, [(1, "heads")], targets=0, means=means)


def test_rank_correlation_with_exact_patching_on_the_embedded_model(digits_model, digits_val, digits_means):
    """Mean-ablation effects of the 384 MLP neurons of the last block on 8 validation images."""
    from scipy.stats import spearmanr

    from analyses.common.attribution_patching import attribution_patching, exact_patching

    images, labels = digits_val.subset(list(range(0, 360, 45))).tensors(show_progress=False)
    site = digits_model.sites[-1, "mlp_act"]
    estimate = attribution_patching(digits_model, images, [site], targets=labels, means=digits_means)
    exact = exact_patching(digits_model, images, site, targets=labels, means=digits_means, batch_size=1024)
    per_pair = spearmanr(estimate.estimates[site.hook_name].flatten(), exact.flatten()).statistic
    per_unit = spearmanr(estimate.estimates[site.hook_name].mean(0), exact.mean(0)).statistic
    print(f"Spearman vs exact patching at {site.hook_name}: per (image, unit) {per_pair:.4f}, "
          f"per unit (mean over images) {per_unit:.4f}")
    assert per_pair > 0.8 and per_unit > 0.8
