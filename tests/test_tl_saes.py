"""sae-lens's HookedSAETransformer methods on HookedViT (run_with_saes, run_with_cache_with_saes,
run_with_hooks_with_saes, add_sae, reset_saes, saes()) for an SAE saved in sae-lens's format and
loaded with ``sae_lens.SAE.load_from_disk``; sae-lens hook names in the cache."""

from __future__ import annotations

import pytest
import torch

HOOK = "blocks.0.hook_resid_post"
ACTS = HOOK + ".hook_sae_acts_post"


def _sae(seed: int, tokens: str, tmp_path_factory):
    """A random BatchTopK-trained-style inference SAE (d_in 32, d_sae 64) on ``HOOK``, saved by
    sae-lens and loaded back with ``SAE.load_from_disk``."""
    from analyses.layer.sae import SAETrainConfig, to_inference_sae
    from sae_lens import SAE, BatchTopKTrainingSAE

    cfg = SAETrainConfig(hook_name=HOOK, tokens=tokens, k=8, expansion_factor=2, training_samples=256,
                         train_batch_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        training = BatchTopKTrainingSAE(cfg.sae_config(32, "cpu"))
        training.W_dec.data.normal_()
        training.topk_threshold.fill_(0.05)
    training.cfg.metadata.hook_name, training.cfg.metadata.tokens = HOOK, tokens
    path = tmp_path_factory.mktemp(f"sae{seed}")
    to_inference_sae(training).save_model(path)
    return SAE.load_from_disk(str(path), device="cpu").eval()


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    return _sae(0, "patch", tmp_path_factory)


@pytest.fixture(scope="module")
def other_sae(tmp_path_factory):
    return _sae(1, "all", tmp_path_factory)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(12))


def test_run_with_cache_with_saes_caches_latents_under_sae_lens_names(tiny, sae, images):
    with torch.no_grad():
        clean_logits, clean = tiny.run_with_cache(images, names_filter=HOOK)
        logits, cache = tiny.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)
    assert tiny.acts_to_saes == {} and HOOK + ".hook_sae_input" not in tiny.hook_dict  # removed after the run
    for which in ("input", "acts_pre", "acts_post", "recons", "error", "output"):  # sae-lens's names
        assert f"{HOOK}.hook_sae_{which}" in cache.keys()
    acts = cache[ACTS]
    assert acts.shape == (3, 16, 64)  # [batch, patch tokens, d_sae]
    patches = clean[HOOK][:, 1:]
    with torch.no_grad():  # independent: sae-lens's own encode on the patch tokens of the clean stream
        torch.testing.assert_close(acts, sae.encode(patches), rtol=0, atol=1e-6)
        torch.testing.assert_close(cache[HOOK + ".hook_sae_acts_pre"], patches @ sae.W_enc + sae.b_enc, rtol=0,
                                   atol=1e-5)
        torch.testing.assert_close(cache[HOOK + ".hook_sae_error"], patches - sae(patches), rtol=0, atol=1e-5)
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"  # the SAE's hooks get their names back
    assert (acts > 0).any()
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=1e-5)  # the error term keeps the output


def test_run_with_saes_splices_the_reconstruction(tiny, sae, images):
    with torch.no_grad():
        spliced = tiny.run_with_saes(images, saes=sae, use_error_term=False)

        def reconstruct(act, hook):  # independent: the patch tokens through sae-lens's forward
            return torch.cat([act[:, :1], sae(act[:, 1:])], dim=1)

        expected = tiny.run_with_hooks(images, fwd_hooks=[(HOOK, reconstruct)])
        clean = tiny(images)
    torch.testing.assert_close(spliced, expected, rtol=0, atol=1e-5)
    assert (spliced - clean).abs().max() > 1e-3
    assert torch.equal(tiny(images), clean)


def test_add_sae_reset_saes_and_context_restoring_the_previous_sae(tiny, sae, other_sae, images):
    with torch.no_grad():
        clean = tiny(images)
        tiny.add_sae(sae)
        try:
            assert list(tiny.acts_to_saes) == [HOOK] and tiny.acts_to_saes[HOOK] is sae
            with_sae = tiny(images)
            assert (with_sae - clean).abs().max() > 1e-3
            with tiny.saes(saes=[other_sae]):  # replaces the SAE at HOOK for the block
                assert tiny.acts_to_saes[HOOK] is other_sae
                _, cache = tiny.run_with_cache(images, names_filter=ACTS)
                assert cache[ACTS].shape == (3, 17, 64)  # tokens="all": CLS + patches
                _, at_cls = tiny.run_with_cache(images, names_filter=ACTS, pos_slice=0)
                assert torch.equal(at_cls[ACTS], cache[ACTS][:, :1])  # on every token: positions slice
            assert tiny.acts_to_saes[HOOK] is sae  # the previous SAE is back
            assert torch.equal(tiny(images), with_sae)
            _, cache = tiny.run_with_cache(images, names_filter=ACTS, pos_slice=0)
            assert cache[ACTS].shape == (3, 16, 64)  # patch tokens only: no position axis to slice
            feature = int(cache[ACTS].gt(0).sum((0, 1)).argmax())
            ablate = lambda acts, hook: acts.index_fill(-1, torch.tensor([feature]), 0.0)  # noqa: E731
            ablated = tiny.run_with_hooks_with_saes(images, saes=[other_sae], fwd_hooks=[(ACTS, ablate)])
            assert not torch.equal(ablated, tiny.run_with_saes(images, saes=[other_sae]))
        finally:
            tiny.reset_saes()
    assert tiny.acts_to_saes == {}
    with torch.no_grad():
        assert torch.equal(tiny(images), clean)
    tiny.reset_saes()  # nothing attached: a no-op
    with pytest.raises(ValueError, match="no SAE is attached"):
        tiny.reset_saes(HOOK)
    with pytest.raises(NotImplementedError, match="no special tokens"):
        tiny.run_with_saes(images, saes=[sae], exclude_special_tokens=True)
    assert tiny.acts_to_saes == {}  # refused before splicing
    sae.cfg.metadata.hook_name_out = "blocks.1.hook_resid_post"  # a transcoder's metadata
    try:
        with pytest.raises(NotImplementedError, match="transcoder"):
            tiny.add_sae(sae)
    finally:
        sae.cfg.metadata.hook_name_out = None
    assert tiny.acts_to_saes == {}
