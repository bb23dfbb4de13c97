"""Layer level: quality formulas against hand-computed values, streaming evaluation, sweeps, the
end-to-end run over a dense and a pruned model, and the sae-train / sae-eval commands."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import make_timm

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def quality():
    import analyses.layer.sae_quality as quality

    return quality


@pytest.fixture(scope="module")
def layer():
    import analyses.layer.level as layer

    return layer


@pytest.fixture(scope="module")
def models():
    """A 2-block DeiT-III (width 32, 17 tokens) and a 50%-magnitude-pruned copy of it."""
    from hooked_vit import HookedViT
    from hooked_vit.pruning import prune

    dense = HookedViT.from_timm(make_timm("deit3_small_patch16_224", depth=2, img_size=32, patch_size=8,
                                          embed_dim=32, num_heads=2, num_classes=3))
    pruned = copy.deepcopy(dense)
    prune(pruned, method="magnitude", sparsity=0.5)
    return {0.0: dense, 0.5: pruned}


@pytest.fixture(scope="module")
def data():
    from hooked_vit.data import LabelledImages

    generator = torch.Generator().manual_seed(5)
    make = lambda n: LabelledImages.from_tensors(  # noqa: E731
        torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % 3, ["a", "b", "c"], name="noise")
    return make(60), make(24)


def test_nmse_explained_variance_and_dead_latents_by_hand(quality):
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    # mean (0.5, 0.5): total variance 4 * 0.5 = 2; squared error 1 -> NMSE 1/2.
    assert quality.nmse(x, x_hat) == pytest.approx(0.5)
    assert quality.explained_variance(x, x_hat) == pytest.approx(0.5)
    assert quality.nmse(x, x) == 0.0
    acts = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.5], [0.0, 3.0, 0.0, 0.0]])
    assert quality.dead_latents(acts).tolist() == [True, False, True, False]
    acc = quality.QualityAccumulator(d_in=2, d_sae=4)
    acc.update(x[:1], x_hat[:1], acts[:1])
    acc.update(x[1:], x_hat[1:], torch.cat([acts[1:], torch.zeros(1, 4)]))
    result = acc.result()
    assert result.nmse == pytest.approx(0.5) and result.explained_variance == pytest.approx(0.5)
    assert result.mse == pytest.approx(1 / 8)  # 1 over 4 rows x 2 dims
    assert result.l0 == pytest.approx(3 / 4) and result.dead_latents == 2 and result.dead_fraction == 0.5
    assert result.n_tokens == 4 and result.d_sae == 4
    with pytest.raises(ValueError, match="no variance"):
        acc2 = quality.QualityAccumulator(d_in=2, d_sae=1)
        acc2.update(torch.ones(3, 2), torch.ones(3, 2), torch.zeros(3, 1))
        acc2.result()


def test_streaming_accumulator_matches_one_shot(quality):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=generator) * 3 + 5  # far from the origin: centring matters
    x_hat = x + 0.3 * torch.randn(300, 8, generator=generator)
    acts = torch.relu(torch.randn(300, 16, generator=generator) - 1.5)
    acts[:, 3] = 0
    acc = quality.QualityAccumulator(8, 16)
    for start in (0, 7, 150, 299):
        end = {0: 7, 7: 150, 150: 299, 299: 300}[start]
        acc.update(x[start:end], x_hat[start:end], acts[start:end])
    result = acc.result()
    assert result.nmse == pytest.approx(quality.nmse(x, x_hat), rel=1e-9)
    assert result.dead_latents == int(quality.dead_latents(acts).sum()) >= 1
    assert result.l0 == pytest.approx(float((acts > 0).sum(1).double().mean()))


def test_evaluate_sae_matches_direct_computation(models, data, quality):
    from analyses.layer.activation_store import ActivationStore, ActivationStoreConfig
    from analyses.layer.sae import BatchTopKTrainingSAE, SAETrainConfig, to_inference_sae

    model, held_out = models[0.0], data[1]
    cfg = SAETrainConfig(hook_name=HOOK, tokens="patch", k=4, expansion_factor=2, training_samples=256,
                         train_batch_size=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        training = BatchTopKTrainingSAE(cfg.sae_config(32, "cpu"))
        training.topk_threshold.fill_(0.02)
    training.cfg.metadata.hook_name, training.cfg.metadata.tokens = HOOK, "patch"
    sae = to_inference_sae(training)
    result = quality.evaluate_sae(model, sae, held_out, image_batch_size=5, progress=False)
    x = ActivationStore(model, held_out, ActivationStoreConfig(hook_names=(HOOK,), tokens="patch", shuffle=False,
                                                               progress=False)).collect()[0][HOOK]
    with torch.no_grad():
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
    assert result.n_tokens == 24 * 16 and result.d_sae == 64
    assert result.nmse == pytest.approx(quality.nmse(x, x_hat), rel=1e-6)
    assert result.dead_latents == int(quality.dead_latents(acts).sum())
    assert result.l0 == pytest.approx(float((acts > 0).sum(1).double().mean()), rel=1e-9)


def test_sweep_settings_vary_one_factor_at_a_time(quality):
    from analyses.layer.sae import SAETrainConfig

    base = SAETrainConfig(tokens="cls", k=4, expansion_factor=2)
    sweep = quality.SweepConfig(base=base, ks=(2, 4, 8), expansion_factors=(2, 4), tokens=("cls", "all"))
    assert [(c.tokens, c.k, c.expansion_factor) for c in sweep.settings()] == [
        ("cls", 4, 2), ("cls", 2, 2), ("cls", 8, 2), ("cls", 4, 4), ("all", 4, 2)]
    grid = quality.SweepConfig(base=base, ks=(2, 4, 8), expansion_factors=(2, 4), tokens=("cls", "all"), grid=True)
    assert len(grid.settings()) == 12
    assert quality.sae_label(base) == "last_resid_post-cls-k4-x2"
    with pytest.raises(ValueError, match="tokens must be one of"):
        quality.SweepConfig(tokens=("cls", "image"))


def test_layer_level_end_to_end(models, data, layer, quality, tmp_path):
    from analyses.layer.sae import SAETrainConfig

    train, held_out = data
    sae = SAETrainConfig(hook_name=HOOK, tokens="all", k=4, expansion_factor=2, training_samples=128 * 40,
                         train_batch_size=128, buffer_size=512, lr=1e-2, topk_threshold_lr=0.1, log_every=20,
                         dead_feature_window=20, progress=False)
    config = layer.LayerLevelConfig(model="tiny", sparsities=(0.0, 0.5), method="magnitude", sae=sae, top_k=5,
                                    batch_size=8)
    loader = lambda cfg, sparsity: models[sparsity]  # noqa: E731
    runs = layer.train_layer_level(config, tmp_path, model_loader=loader, train_dataset=train)
    assert [r.out_dir for r in runs] == [tmp_path / "sparsity_0" / "blocks.0.hook_resid_post-all-k4-x2",
                                         tmp_path / "sparsity_0.5" / "blocks.0.hook_resid_post-all-k4-x2"]
    result = layer.run_layer_level(config, tmp_path, model_loader=loader, dataset=held_out, show_progress=False)

    assert [q["sparsity"] for q in result.quality] == [0.0, 0.5]
    for q in result.quality:
        assert 0 < q["nmse"] < 0.6 and q["explained_variance"] == pytest.approx(1 - q["nmse"])
        assert q["n_tokens"] == 24 * 17 and q["d_sae"] == 64 and 0 <= q["dead_latents"] <= 64
    assert len(result.rows) == 2 * 3 and {r["class"] for r in result.rows} == {0, 1, 2}
    for r in result.rows:
        assert 0.0 <= r["selectivity"] <= 1.0 and 0.0 <= r["label_entropy"] <= math.log(3) + 1e-6
        assert r["class_variance"] >= 0.0 and math.isfinite(r["ablation"])
    latent = result.latents[0]
    assert len(latent["latents"]) == 5 and latent["scores"] == sorted(latent["scores"], reverse=True)
    for name in ("result.json", "quality.csv", "per_class.csv", "summary.csv", "summary.md", "figure.png"):
        assert (tmp_path / name).is_file(), name
    assert "| dense |" in (tmp_path / "summary.md").read_text()
    loaded = layer.LayerLevelResult.load(tmp_path)
    assert loaded.config == config and loaded.quality == result.quality and loaded.rows == result.rows

    # The top latent of class 0: its ablation impact is the logit drop of zeroing it, measured.
    model = models[0.0]
    sae_dir = runs[0].out_dir
    from analyses.layer.sae import load_sae

    trained = load_sae(sae_dir)
    images = held_out.subset(torch.nonzero(held_out.labels == 0).reshape(-1)).tensors(show_progress=False)[0]
    clean = model(images)
    none = layer.ablated_logits(model, trained, images, torch.tensor([], dtype=torch.long), batch_size=8)
    assert torch.allclose(none, clean, atol=1e-5)
    every = layer.ablated_logits(model, trained, images, torch.arange(64), batch_size=8)
    assert (every - clean).abs().max() > 1e-3

    # An SAE trained on other weights is refused.
    swapped = lambda cfg, sparsity: models[0.5 if sparsity == 0.0 else 0.0]  # noqa: E731
    with pytest.raises(ValueError, match="trained on other weights"):
        layer.run_layer_level(config, tmp_path, model_loader=swapped, dataset=held_out, features=False,
                              show_progress=False)


def test_sae_train_and_eval_commands(tmp_path, capsys):
    from hooked_vit.cli import main

    out = tmp_path / "run"
    args = ["sae-train", "--model", "deit3_tiny_digits", "--sparsities", "0", "--k", "4", "--expansion", "2",
            "--train-split", "val",
            "--samples", "2048", "--train-batch-size", "256", "--checkpoints", "1", "--log-every", "4",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "dense: trained in" in printed and "d_sae 192" in printed
    sae_dir = out / "sparsity_0" / "last_resid_post-cls-k4-x2"
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert main(args) == 0 and "dense: loaded (already trained)" in capsys.readouterr().out
    assert main(["sae-eval", "--out", str(out), "--top-k", "3", "--classes", "0,1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "/ 192 (0." in printed  # dead latents: count of d_sae and fraction
    rows = (out / "quality.csv").read_text()
    assert "n_tokens" in rows and ",360," in rows  # the 360 held-out CLS tokens are the dead-latent window
    assert main(["sae-eval", "--out", str(tmp_path / "missing")]) == 2
    assert "no layer-level run" in capsys.readouterr().err
