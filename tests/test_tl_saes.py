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


# sae-lens transcoders: read one hook, write another (spliced at the output hook, as sae-lens does).
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
TC_ACTS = TC_OUT + ".hook_sae_acts_post"  # sae-lens puts the hook points under the output hook


@pytest.fixture(scope="module")
def digits_model():
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained("deit3_tiny_digits")


@pytest.fixture(scope="module")
def digits_images(digits_model):
    from hooked_vit.data import load_dataset

    images, _ = load_dataset("digits", split="val", model=digits_model).subset(range(6)).tensors(show_progress=False)
    return images


def _transcoder(d_in: int, d_out: int, hook_in: str = TC_IN, hook_out: str = TC_OUT, tokens: str = "patch", seed=0):
    """A sae-lens ``Transcoder`` (ReLU, d_sae 128) with random weights."""
    from sae_lens import Transcoder, TranscoderConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transcoder = Transcoder(TranscoderConfig(d_in=d_in, d_sae=128, d_out=d_out, apply_b_dec_to_input=False))
        with torch.no_grad():
            transcoder.b_enc.normal_(0.0, 0.1)
            transcoder.b_dec.normal_(0.0, 0.1)
    metadata = transcoder.cfg.metadata
    metadata.hook_name, metadata.hook_name_out, metadata.tokens = hook_in, hook_out, tokens
    return transcoder.eval()


@pytest.fixture(scope="module")
def transcoder(digits_model):
    d_model = digits_model.cfg.d_model
    return _transcoder(d_model, d_model)


def _state(model):
    """What a splice must leave as it found it: the hook modules and every forward hook."""
    return {name: (module, list(module.fwd_hooks), dict(module._forward_hooks))
            for name, module in model.hook_dict.items()}


def test_transcoder_error_term_keeps_logits_and_caches_under_the_output_hook(digits_model, transcoder, digits_images):
    model, n_patch = digits_model, digits_model.cfg.n_ctx - 1
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(digits_images, names_filter=[TC_IN, TC_OUT])
        with model.saes(saes=[transcoder], use_error_term=True):
            assert model.acts_to_saes == {TC_IN: transcoder}  # keyed by the input hook, as in sae-lens
            assert TC_ACTS in model.hook_dict and TC_IN + ".hook_sae_acts_post" not in model.hook_dict
            logits, cache = model.run_with_cache(digits_images)
    assert model.acts_to_saes == {}
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=1e-5)
    d_model = model.cfg.d_model
    shapes = {"input": d_model, "acts_pre": 128, "acts_post": 128, "recons": d_model, "error": d_model,
              "output": d_model}
    for which, width in shapes.items():  # sae-lens's names: {hook_name_out}.hook_sae_*
        assert cache[f"{TC_OUT}.hook_sae_{which}"].shape == (6, n_patch, width)
    inputs, outputs = clean[TC_IN][:, 1:], clean[TC_OUT][:, 1:]  # the patch tokens of the clean run
    with torch.no_grad():  # independent: sae-lens's own encode/decode on the clean input hook
        torch.testing.assert_close(cache[TC_OUT + ".hook_sae_input"], inputs, rtol=0, atol=1e-6)
        torch.testing.assert_close(cache[TC_ACTS], transcoder.encode(inputs), rtol=0, atol=1e-5)
        torch.testing.assert_close(cache[TC_OUT + ".hook_sae_error"], outputs - transcoder.decode(
            transcoder.encode(inputs)), rtol=0, atol=1e-5)
    torch.testing.assert_close(cache[TC_OUT + ".hook_sae_output"], outputs, rtol=0, atol=1e-5)
    assert (cache[TC_ACTS] > 0).any() and (cache[TC_ACTS] == 0).any()


def test_transcoder_splice_matches_an_independent_re_derivation(digits_model, transcoder, digits_images):
    model = digits_model
    stored = {}

    def store(act, hook):
        stored["input"] = act.clone()

    def replace(act, hook):  # at the patch tokens: decode(encode(input hook's patch tokens))
        out = act.clone()
        out[:, 1:] = transcoder.decode(transcoder.encode(stored["input"][:, 1:]))
        return out

    with torch.no_grad():
        spliced = model.run_with_saes(digits_images, saes=[transcoder], use_error_term=False)
        expected = model.run_with_hooks(digits_images, fwd_hooks=[(TC_IN, store), (TC_OUT, replace)])
        clean = model(digits_images)
        with_hooks = model.run_with_hooks_with_saes(digits_images, saes=[transcoder], fwd_hooks=[
            (TC_ACTS, lambda acts, hook: torch.zeros_like(acts))])  # all latents off: the output is b_dec
        expected_zero = model.run_with_hooks(digits_images, fwd_hooks=[
            (TC_OUT, lambda act, hook: torch.cat([act[:, :1], transcoder.b_dec.expand_as(act[:, 1:])], 1))])
    torch.testing.assert_close(spliced, expected, rtol=0, atol=1e-5)
    assert (spliced - clean).abs().max() > 1e-3
    torch.testing.assert_close(with_hooks, expected_zero, rtol=0, atol=1e-5)


def test_transcoder_leaves_the_model_as_it_found_it(digits_model, transcoder, digits_images):
    from hooked_vit.saes import attach_sae, detach_sae, spliced

    model = digits_model
    before = _state(model)
    with torch.no_grad():
        clean = model(digits_images)
        model.add_sae(transcoder)
        try:
            assert len(model.hook_dict[TC_IN].fwd_hooks) == 1  # the permanent capturing hook
            model.reset_hooks()  # keeps it (permanent), as in sae-lens
            with_tc = model(digits_images)
            other = _transcoder(model.cfg.d_model, model.cfg.d_model, seed=1)
            with model.saes(saes=[other]):  # replaces the transcoder keyed at TC_IN for the block
                assert model.acts_to_saes == {TC_IN: other}
                assert len(model.hook_dict[TC_IN].fwd_hooks) == 1
                assert not torch.equal(model(digits_images), with_tc)
            assert model.acts_to_saes == {TC_IN: transcoder}  # put back
            assert torch.equal(model(digits_images), with_tc)
        finally:
            model.reset_saes()
        assert _state(model) == before and torch.equal(model(digits_images), clean)
        with spliced(model, transcoder, use_error_term=False):
            assert torch.equal(model(digits_images), with_tc)
        assert _state(model) == before
        splice = attach_sae(model, transcoder)
        assert splice.input_name == TC_IN and detach_sae(model, TC_OUT) is transcoder  # either hook names it
        assert _state(model) == before and torch.equal(model(digits_images), clean)

        def user_hook(act, hook):
            return None

        model.hook_dict[TC_IN].add_hook(user_hook, is_permanent=True)  # the user's own permanent hook survives
        try:
            model.run_with_saes(digits_images, saes=[transcoder])
            assert [h.user_hook for h in model.hook_dict[TC_IN].fwd_hooks] == [user_hook]
        finally:
            model.reset_hooks(including_permanent=True)
    assert _state(model) == before
    assert transcoder.hook_sae_acts_post.name == "hook_sae_acts_post"


@pytest.mark.parametrize("hooks, widths, message", [
    ((TC_IN, TC_OUT), (64, 96), "the SAE reads 64-wide activations but blocks.1.ln2.hook_normalized gives 96"),
    ((TC_IN, "blocks.1.mlp.hook_post"), (96, 96),
     "the SAE writes 96-wide activations but blocks.1.mlp.hook_post is 384 wide"),
    ((TC_IN, "blocks.1.hook_mlp_outt"), (96, 96), "Unknown hook name(s): 'blocks.1.hook_mlp_outt' (did you mean"),
    (("blocks.2.ln2.hook_normalized", TC_OUT), (96, 96),
     "the transcoder reads blocks.2.ln2.hook_normalized, which fires after its output hook blocks.1.hook_mlp_out"),
])
def test_transcoder_bad_input_is_refused_before_anything_changes(digits_model, digits_images, hooks, widths, message):
    from hooked_vit.saes import attach_sae

    model = digits_model
    bad = _transcoder(*widths, *hooks)
    before = _state(model)
    for splice in (model.add_sae, lambda sae: model.run_with_saes(digits_images, saes=[sae]),
                   lambda sae: attach_sae(model, sae)):
        with pytest.raises((ValueError, KeyError)) as error:
            splice(bad)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
        assert model.acts_to_saes == {} and _state(model) == before
