"""Mean activations (analyses.common.ablation): the streaming means equal the means of cached runs, the
store saves/reloads keyed by model and dataset, and ablation hooks replace exactly the chosen units
(mean, zero, fractional and differentiable masks) and nothing else."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def labelled(images_64):
    from hooked_vit.data import LabelledImages

    images = torch.cat([images_64, images_64.flip(-1), images_64 * 0.5])  # 9 images
    return LabelledImages.from_tensors(images, torch.arange(9) % 3, ["a", "b", "c"], name="random")


@pytest.fixture(scope="module")
def means(small_hooked, labelled):
    from analyses.common.ablation import compute_means

    return compute_means(small_hooked, labelled, batch_size=4, show_progress=False)


def test_means_match_cached_runs_per_position_and_pooled(small_hooked, labelled, means):
    from analyses.common.ablation import default_mean_hooks

    hooks = default_mean_hooks(small_hooked)
    assert len(hooks) == 8 * 2 + 2 and set(hooks) == set(means.means)  # 8 sites x 2 blocks + attn.hook_z
    images, _ = labelled.tensors()
    _, cache = small_hooked.run_with_cache(images, names_filter=hooks)
    for name in hooks:
        expected = cache[name].double().mean(0)
        assert means.mean(name).shape == expected.shape
        torch.testing.assert_close(means.mean(name).double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(means.mean(name, pooled=True).double(), expected.mean(0), rtol=1e-5, atol=1e-6)
    assert means.mean("blocks.1.attn.hook_q").shape == (17, 6, 64)  # per position, head, d_head
    assert means.n_images == 9


def test_means_save_reload_keyed_by_model_and_dataset(small_hooked, labelled, means, tmp_path, monkeypatch):
    import analyses.common.ablation as ablation

    path = means.save(tmp_path / "m.safetensors")
    loaded = ablation.ActivationMeans.load(path)
    assert loaded.model_key == means.model_key and loaded.dataset_key == means.dataset_key
    assert all(torch.equal(loaded.means[k], means.means[k]) for k in means.means)

    first = ablation.load_or_compute_means(small_hooked, labelled, directory=tmp_path, show_progress=False)
    stored = ablation.means_path(small_hooked, labelled, tmp_path)
    assert stored.is_file()
    monkeypatch.setattr(ablation, "compute_means", lambda *a, **k: pytest.fail("recomputed instead of reloading"))
    again = ablation.load_or_compute_means(small_hooked, labelled, directory=tmp_path, show_progress=False)
    assert all(torch.equal(again.means[k], first.means[k]) for k in first.means)
    # Another dataset (other images/labels) or other weights have another key.
    other = labelled.subset([0, 1, 2, 3])
    assert ablation.means_path(small_hooked, other, tmp_path) != stored
    assert ablation.dataset_key(other) != ablation.dataset_key(labelled)


def test_mean_ablation_replaces_exactly_the_chosen_units(small_hooked, labelled, means):
    from analyses.common.ablation import mean_ablation_hooks

    images, _ = labelled.tensors()
    units = {(1, "mlp_act"): [3, 100, 1535], (0, "q"): [2], (1, "attn_head"): [0, 5]}
    hooks = mean_ablation_hooks(small_hooked, units, means)
    names = ["blocks.1.mlp.hook_post", "blocks.0.attn.hook_q", "blocks.1.attn.hook_z", "blocks.0.hook_resid_pre"]
    _, clean = small_hooked.run_with_cache(images, names_filter=names)
    seen = {}

    def capture(act, hook):
        seen[hook.name] = act.detach().clone()

    ablated_logits = small_hooked.run_with_hooks(images, fwd_hooks=hooks + [(n, capture) for n in names])
    for (layer, name), chosen in units.items():
        hook = {"mlp_act": f"blocks.{layer}.mlp.hook_post", "q": f"blocks.{layer}.attn.hook_q",
                "attn_head": f"blocks.{layer}.attn.hook_z"}[name]
        act, mean = seen[hook], means.mean(hook)
        # Chosen units equal the stored per-position mean in every image.
        assert torch.equal(act[:, :, chosen], mean[:, chosen].expand_as(act[:, :, chosen]))
    # Block 0's q is upstream of the block-1 ablations: its other heads are untouched.
    assert torch.equal(seen["blocks.0.attn.hook_q"][:, :, [0, 1, 3, 4, 5]], clean["blocks.0.attn.hook_q"][:, :, [0, 1, 3, 4, 5]])
    assert torch.equal(seen["blocks.0.hook_resid_pre"], clean["blocks.0.hook_resid_pre"])
    assert not torch.allclose(ablated_logits, small_hooked(images))
    # Alone, an ablation leaves the site's other units at their clean values.
    hook = "blocks.1.mlp.hook_post"
    small_hooked.run_with_hooks(images, fwd_hooks=mean_ablation_hooks(small_hooked, {(1, "mlp_act"): [3, 100]}, means)
                                + [(hook, capture)])
    others = [u for u in range(1536) if u not in (3, 100)]
    assert torch.equal(seen[hook][:, :, others], clean[hook][:, :, others])
    assert torch.equal(seen[hook][:, :, [3, 100]], means.mean(hook)[:, [3, 100]].expand(9, 17, 2))
    # Pooled means: the chosen units equal the image-and-token mean at every position.
    pooled = mean_ablation_hooks(small_hooked, {(1, "mlp_act"): [3]}, means, pooled=True)
    small_hooked.run_with_hooks(images, fwd_hooks=pooled + [("blocks.1.mlp.hook_post", capture)])
    torch.testing.assert_close(seen["blocks.1.mlp.hook_post"][:, :, 3],
                               means.mean("blocks.1.mlp.hook_post", pooled=True)[3].expand(9, 17))


def test_zero_ablation_and_soft_differentiable_mask(small_hooked, labelled, means):
    from analyses.common.ablation import ablation_hook, zero_ablation_hooks

    images, _ = labelled.tensors()
    site = small_hooked.sites[0, "v"]
    seen = {}
    small_hooked.run_with_hooks(images, fwd_hooks=zero_ablation_hooks(small_hooked, {site: [1, 4]})
                                + [(site.hook_name, lambda a, hook: seen.setdefault("v", a.detach()))])
    assert seen["v"][:, :, [1, 4]].eq(0).all() and seen["v"][:, :, [0, 2, 3, 5]].ne(0).any()

    # Circuit-style mask: a_tilde = m a + (1 - m) mean, m per head, learnable.
    mask = torch.full(site.mask_shape, 0.25, requires_grad=True)
    mean = means.mean(site.hook_name)
    _, clean = small_hooked.run_with_cache(images, names_filter=[site.hook_name])
    out = {}

    def capture(act, hook):
        out["v"] = act

    logits = small_hooked.run_with_hooks(images, fwd_hooks=[(site.hook_name, ablation_hook(mask, mean)),
                                                           (site.hook_name, capture)])
    torch.testing.assert_close(out["v"], 0.25 * clean[site.hook_name] + 0.75 * mean)
    logits[:, 0].sum().backward()
    assert mask.grad is not None and mask.grad.shape == site.mask_shape and mask.grad.abs().sum() > 0
    small_hooked.zero_grad(set_to_none=True)  # the model is shared by other tests


def test_site_resolution_and_errors(small_hooked, means):
    from analyses.common.ablation import ablation_hooks, attention_head_site, resolve_site, unit_mask

    head = resolve_site(small_hooked, "blocks.1.attn.hook_z")
    assert head == attention_head_site(small_hooked, -1) and head.unit == "head" and head.width == 6
    assert resolve_site(small_hooked, (1, "mlp_act")) == small_hooked.sites[1, "mlp_act"]
    assert resolve_site(small_hooked, "blocks.0.hook_attn_out") == small_hooked.sites[0, "attn_out"]
    assert unit_mask(head, [2]).flatten().tolist() == [1, 1, 0, 1, 1, 1]
    with pytest.raises(KeyError, match="Unknown site"):
        resolve_site(small_hooked, (0, "mlp"))
    with pytest.raises(KeyError, match="out of range"):
        resolve_site(small_hooked, (5, "attn_head"))
    with pytest.raises(KeyError, match="neither a circuit-site hook"):
        resolve_site(small_hooked, "blocks.0.hook_resid_pre")
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        unit_mask(head, [6])
    with pytest.raises(ValueError, match="needs means="):
        ablation_hooks(small_hooked, {head: [0]}, reference="mean")
    with pytest.raises(ValueError, match="reference must be one of"):
        ablation_hooks(small_hooked, {head: [0]}, reference="median", means=means)
    with pytest.raises(KeyError, match="no mean stored"):
        means.mean("hook_pooled")

