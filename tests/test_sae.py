"""SAEs through sae-lens: training lowers NMSE, save/load with sae-lens's loader, resume, splicing
with and without the error term, feature ablation and patching."""

from __future__ import annotations

import json
import shutil

import pytest
import torch


HOOK = "blocks.1.hook_resid_post"
SPLICE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def dataset(images):
    from hooked_vit.data import LabelledImages

    return LabelledImages.from_tensors(images, torch.arange(48) % 3, ["a", "b", "c"])


@pytest.fixture(scope="module")
def sae_module():
    import analyses.layer.sae as sae_module

    return sae_module


def small_config(sae_module, **overrides):
    base = dict(hook_name=HOOK, tokens="all", k=8, expansion_factor=4, training_samples=128 * 60,
                train_batch_size=128, buffer_size=512, lr=1e-2, topk_threshold_lr=0.1, log_every=10,
                dead_feature_window=20)
    return sae_module.SAETrainConfig(**{**base, **overrides})


def nmse(x, x_hat):
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.fixture(scope="module")
def trained(tiny, dataset, sae_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "run"
    cfg = small_config(sae_module, n_checkpoints=3, keep_checkpoints=5)
    return sae_module.train_sae(tiny, dataset, cfg, out_dir=out, resume=False, progress=False)


def all_activations(model, dataset, sae_module, tokens="all"):
    from analyses.layer.activation_store import ActivationStore, ActivationStoreConfig

    store = ActivationStore(model, dataset, ActivationStoreConfig(hook_names=(HOOK,), tokens=tokens, shuffle=False,
                                                                  progress=False))
    return store.collect()[0][HOOK]


def test_training_lowers_nmse_substantially(tiny, dataset, sae_module, trained):
    x = all_activations(tiny, dataset, sae_module)
    cfg = trained.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        initial = sae_module.BatchTopKTrainingSAE(cfg.sae_config(x.shape[1], "cpu"))
    with torch.no_grad():
        before = nmse(x, initial(x))
        after_batchtopk = nmse(x, trained.training_sae(x))
        after = nmse(x, trained.sae(x))
    assert before > 0.9
    assert after_batchtopk < 0.35 * before and after < 0.35 * before
    log = trained.log
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    assert log[-1]["mse_loss"] < 0.5 * log[0]["mse_loss"] and log[-1]["l0"] == pytest.approx(8.0)
    assert {"explained_variance", "dead_latents", "lr", "topk_threshold", "aux_loss"} <= set(log[-1])
    lines = (trained.out_dir / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == log


def test_saved_sae_loads_with_sae_lens_identically(tiny, dataset, sae_module, trained):
    from sae_lens import SAE
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE

    loaded = SAE.load_from_disk(str(trained.out_dir))
    assert isinstance(loaded, JumpReLUSAE) and isinstance(trained.sae, JumpReLUSAE)
    assert loaded.cfg.metadata.hook_name == HOOK and loaded.cfg.metadata.tokens == "all"
    assert loaded.cfg.metadata.training_architecture == "batchtopk"
    assert loaded.cfg.d_sae == 4 * 32
    x = all_activations(tiny, dataset, sae_module)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), trained.sae.encode(x))
        assert torch.equal(loaded(x), trained.sae(x))
    threshold = float(trained.training_sae.topk_threshold)
    assert threshold > 0 and torch.allclose(loaded.threshold, torch.full_like(loaded.threshold, threshold))
    again = sae_module.train_sae(tiny, dataset, trained.config, out_dir=trained.out_dir, progress=False)  # finished: loaded
    assert again.training_sae is None and torch.equal(again.sae.W_dec, loaded.W_dec) and again.log == trained.log
    with pytest.raises(ValueError, match="config.k"):
        sae_module.train_sae(tiny, dataset, small_config(sae_module, k=3, n_checkpoints=3, keep_checkpoints=5),
                             out_dir=trained.out_dir, progress=False)


def test_training_resumes_from_a_checkpoint_exactly(tiny, dataset, sae_module, trained, tmp_path):
    checkpoints = sorted((trained.out_dir / "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert [int(p.name) for p in checkpoints] == [2048, 3968, 5888]  # after samples 1920, 3840, 5760
    # A run interrupted after its first checkpoint: no final SAE, later checkpoints never written.
    crashed = tmp_path / "run"
    shutil.copytree(trained.out_dir, crashed)
    for name in ("training.json", "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        (crashed / name).unlink()
    for later in checkpoints[1:]:
        shutil.rmtree(crashed / "checkpoints" / later.name)
    resumed = sae_module.train_sae(tiny, dataset, trained.config, out_dir=crashed, progress=False)
    assert resumed.resumed_from == crashed / "checkpoints" / "2048"
    for name, value in trained.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert strip(resumed.log) == strip(trained.log)


@pytest.fixture(scope="module")
def random_sae(sae_module):
    """An untrained inference SAE on the patch tokens of block 0 (they reach the logits through block 1's
    attention), with a positive threshold."""
    cfg = small_config(sae_module, expansion_factor=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        training = sae_module.BatchTopKTrainingSAE(cfg.sae_config(32, "cpu"))
        training.W_dec.data.normal_()
        training.topk_threshold.fill_(0.05)
    training.cfg.metadata.hook_name, training.cfg.metadata.tokens = SPLICE, "patch"
    sae = sae_module.to_inference_sae(training)
    sae.threshold.data[-1] = 1e6  # the last latent never fires
    return sae


def test_splice_with_error_term_keeps_logits_and_without_changes_them(tiny, images, sae_module, random_sae):
    clean = tiny(images[:6])
    names = {sae_module.sae_hook(SPLICE, w) for w in sae_module.SAE_HOOK_SUFFIXES}
    with sae_module.spliced(tiny, random_sae, use_error_term=True):
        assert names <= set(tiny.hook_dict)
        assert torch.allclose(tiny(images[:6]), clean, atol=1e-5, rtol=0)
        _, cache = tiny.run_with_cache(images[:6], names_filter=[sae_module.sae_hook(SPLICE, "acts_post"), SPLICE])
        assert cache[sae_module.sae_hook(SPLICE, "acts_post")].shape == (6, 16, 64)
    with sae_module.spliced(tiny, random_sae, use_error_term=False):
        spliced = tiny(images[:6])
        _, plain = tiny.run_with_cache(images[:6], names_filter=[SPLICE])
    assert (spliced - clean).abs().max() > 1e-2
    assert not names & set(tiny.hook_dict)  # detached: hooks gone, logits exact again
    assert torch.equal(tiny(images[:6]), clean)
    _, ref = tiny.run_with_cache(images[:6], names_filter=[SPLICE])
    assert torch.equal(plain[SPLICE][:, 0], ref[SPLICE][:, 0])  # CLS is not the SAE's token: untouched
    x = ref[SPLICE][:, 1:]
    with torch.no_grad():
        assert torch.allclose(plain[SPLICE][:, 1:], random_sae(x), atol=1e-6)


def test_zero_ablating_a_feature_acts_only_through_that_feature(tiny, images, sae_module, random_sae):
    acts_hook = sae_module.sae_hook(SPLICE, "acts_post")
    batch = images[:4]
    with sae_module.spliced(tiny, random_sae, use_error_term=True):
        clean_logits, clean = tiny.run_with_cache(batch, names_filter=[acts_hook, SPLICE])
        acts = clean[acts_hook]
        feature = int((acts > 0).sum(dim=(0, 1)).argmax())
        assert (acts[..., feature] > 0).sum() > 5
        with tiny.hooks(fwd_hooks=[(acts_hook, sae_module.zero_ablate_features([feature]))]):
            ablated_logits, ablated = tiny.run_with_cache(batch, names_filter=[acts_hook, SPLICE])
        never = acts.shape[-1] - 1
        assert (acts[..., never] > 0).sum() == 0
        untouched = tiny.run_with_hooks(batch, fwd_hooks=[(acts_hook, sae_module.zero_ablate_features([never]))])
        same = tiny.run_with_hooks(batch, fwd_hooks=[(acts_hook, sae_module.patch_features([feature],
                                                                                         acts[..., [feature]]))])
    others = torch.ones(acts.shape[-1], dtype=torch.bool)
    others[feature] = False
    assert torch.equal(ablated[acts_hook][..., others], acts[..., others])
    assert torch.all(ablated[acts_hook][..., feature] == 0)
    delta = ablated[SPLICE] - clean[SPLICE]
    assert torch.equal(delta[:, 0], torch.zeros_like(delta[:, 0]))  # CLS: not an SAE token
    expected = -acts[..., feature, None] * random_sae.W_dec[feature]
    assert torch.allclose(delta[:, 1:], expected, atol=1e-5)
    assert (ablated_logits - clean_logits).abs().max() > 1e-4
    assert torch.equal(untouched, clean_logits)
    assert torch.allclose(same, clean_logits, atol=1e-6)


def test_attach_errors(tiny, sae_module, random_sae):
    splice = sae_module.attach_sae(tiny, random_sae)
    try:
        with pytest.raises(ValueError, match="already attached"):
            sae_module.attach_sae(tiny, random_sae)
    finally:
        sae_module.detach_sae(tiny, SPLICE)
    with pytest.raises(ValueError, match="no SAE is attached"):
        sae_module.detach_sae(tiny, SPLICE)
    assert splice.layout.d_in == 32
    random_sae.cfg.metadata.hook_name = "blocks.1.mlp.hook_post"
    try:
        with pytest.raises(ValueError, match="reads 32-wide activations but blocks.1.mlp.hook_post gives 128"):
            sae_module.attach_sae(tiny, random_sae)
    finally:
        random_sae.cfg.metadata.hook_name = SPLICE
    with pytest.raises(ValueError, match="k=999 exceeds the dictionary size"):
        small_config(sae_module, k=999).sae_config(32, "cpu")
    with pytest.raises(ValueError, match="tokens must be one of"):
        small_config(sae_module, tokens="CLS")


def test_dead_window_default_follows_batchtopk_reference(sae_module):
    """BatchTopK's reference counts a latent dead after 5 batches of 4,096 activations without
    firing; sae-lens's window counts steps beyond which a latent is dead (``>``), so 4 steps of
    4,096, scaled to the batch size and capped at a tenth of the run."""
    assert sae_module.dead_window_steps(4096, 2**22) == 4 == sae_module.SAETrainConfig().dead_feature_window
    assert sae_module.dead_window_steps(256, 150_000) == min(20480 // 256 - 1, 585 // 10) == 58
    assert sae_module.dead_window_steps(1024, 2**22) == 19
    assert sae_module.dead_window_steps(8192, 8192 * 5) == 1  # at least one step
    assert sae_module.SAETrainConfig(dead_feature_window=7).dead_feature_window == 7


def test_aux_loss_is_nonzero_on_dead_latents_and_trains_only_them(sae_module):
    from sae_lens.saes.sae import TrainStepInput

    cfg = small_config(sae_module, k=2, expansion_factor=4)
    torch.manual_seed(0)
    sae = sae_module.BatchTopKTrainingSAE(cfg.sae_config(16, "cpu"))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True

    def aux(mask):
        sae.zero_grad()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                                                       n_training_steps=0, is_logging_step=False))
        return out.losses["auxiliary_reconstruction_loss"]

    assert float(aux(torch.zeros_like(dead))) == 0.0  # nothing dead: no auxiliary loss
    loss = aux(dead)
    assert float(loss.detach()) > 0
    loss.backward()
    column_grad = sae.W_enc.grad.abs().sum(0)  # [d_sae]
    assert (column_grad[dead] > 0).any() and (column_grad[~dead] == 0).all()  # it moves dead latents only


def test_default_window_lets_the_aux_loss_act_during_a_short_run(tiny, dataset, sae_module, tmp_path):
    """With the run-scaled window, latents are counted dead within the run and the logged
    auxiliary loss is nonzero (with the old 1,000-step window on a 30-step run it stayed 0)."""
    cfg = small_config(sae_module, k=2, expansion_factor=8, training_samples=128 * 30, log_every=3,
                       dead_feature_window=None)
    assert cfg.dead_feature_window == 3
    run = sae_module.train_sae(tiny, dataset, cfg, out_dir=tmp_path / "run", resume=False, progress=False)
    assert max(r["aux_loss"] for r in run.log) > 0 and max(r["dead_latents"] for r in run.log) > 0
