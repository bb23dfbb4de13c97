"""Layer level: quality formulas against hand-computed values, streaming evaluation, sweeps, the
end-to-end run over a dense and a pruned model (through the level driver), resume after a kill
inside a unit, and the `hooked-vit layer` command."""

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
    import analyses.layer.latents as layer

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
    from analyses.layer.config import SAETrainConfig
    from analyses.layer.sae import BatchTopKTrainingSAE, to_inference_sae

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
    from analyses.layer.config import SAETrainConfig

    base = SAETrainConfig(tokens="cls", k=4, expansion_factor=2)
    sweep = quality.SweepConfig(base=base, ks=(2, 4, 8), expansion_factors=(2, 4), tokens=("cls", "all"))
    assert [(c.tokens, c.k, c.expansion_factor) for c in sweep.settings()] == [
        ("cls", 4, 2), ("cls", 2, 2), ("cls", 8, 2), ("cls", 4, 4), ("all", 4, 2)]
    grid = quality.SweepConfig(base=base, ks=(2, 4, 8), expansion_factors=(2, 4), tokens=("cls", "all"), grid=True)
    assert len(grid.settings()) == 12
    assert quality.sae_label(base) == "last_resid_post-cls-k4-x2"
    with pytest.raises(ValueError, match="tokens must be one of"):
        quality.SweepConfig(tokens=("cls", "image"))


SAE = dict(hook_name=HOOK, tokens="all", k=4, expansion_factor=2, training_samples=128 * 40, train_batch_size=128,
           buffer_size=512, lr=1e-2, topk_threshold_lr=0.1, log_every=20, dead_feature_window=20)


def level(models, data, loader=None):
    from analyses.layer import Layer

    train, held_out = data
    return Layer(show_progress=False, model_loader=loader or (lambda config, variant: models[variant.sparsity]),
                 datasets={"train": train, "val": held_out})


@pytest.fixture(scope="module")
def config():
    from analyses.layer import LayerConfig

    return LayerConfig(model="tiny", sparsities=(0.0, 0.5), method="magnitude", sae=SAE, top_k=5, batch_size=8)


@pytest.fixture(scope="module")
def finished(models, data, config, tmp_path_factory):
    """The level run once, uninterrupted: its output folder and result."""
    from analyses.common.level import run_level

    out = tmp_path_factory.mktemp("layer")
    return out, run_level(level(models, data), config, out)


def test_layer_level_end_to_end(models, data, layer, config, finished):
    from analyses.layer import LayerResult

    held_out = data[1]
    tmp_path, result = finished
    for sparsity in ("0", "0.5"):
        assert (tmp_path / f"sparsity_{sparsity}" / "blocks.0.hook_resid_post-all-k4-x2" / "cfg.json").is_file()
        assert (tmp_path / f"sparsity_{sparsity}" / "sae.json").is_file()

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
    for name in ("result.json", "quality.csv", "per_class.csv", "summary.csv", "summary.md", "figure.png", "done.json"):
        assert (tmp_path / name).is_file(), name
    assert "| dense |" in (tmp_path / "summary.md").read_text()
    loaded = LayerResult.load(tmp_path)
    assert loaded.config == config and loaded.quality == result.quality and loaded.rows == result.rows
    assert not (tmp_path / "sweep").exists() and result.sweep == []

    # The top latent of class 0: its ablation impact is the logit drop of zeroing it, measured.
    model = models[0.0]
    from analyses.layer.sae import load_sae

    trained = load_sae(tmp_path / "sparsity_0" / "blocks.0.hook_resid_post-all-k4-x2")
    images = held_out.subset(torch.nonzero(held_out.labels == 0).reshape(-1)).tensors(show_progress=False)[0]
    clean = model(images)
    none = layer.ablated_logits(model, trained, images, torch.tensor([], dtype=torch.long), batch_size=8)
    assert torch.allclose(none, clean, atol=1e-5)
    every = layer.ablated_logits(model, trained, images, torch.arange(64), batch_size=8)
    assert (every - clean).abs().max() > 1e-3


def test_an_sae_of_other_weights_is_refused(models, data, config, finished):
    import dataclasses

    from analyses.common.level import run_level

    tmp_path, _ = finished
    swapped = lambda cfg, variant: models[0.5 if variant.sparsity == 0.0 else 0.0]  # noqa: E731
    before = (tmp_path / "sparsity_0" / "sae.json").read_bytes()
    with pytest.raises(ValueError, match="trained on other weights"):
        run_level(level(models, data, swapped), dataclasses.replace(config, quality_only=True), tmp_path)
    assert (tmp_path / "sparsity_0" / "sae.json").read_bytes() == before


def test_killed_inside_a_unit_resumes_with_the_same_numbers(models, data, config, finished, tmp_path, monkeypatch):
    """Killed while evaluating the second model (its SAE trained and saved): the rerun keeps the first
    model's unit file as it is, loads the second SAE from disk instead of retraining it, and gives
    the uninterrupted run's numbers."""
    import analyses.layer.latents as latents
    from analyses.common.level import run_level

    evaluate = latents.evaluate_layer
    calls = []

    def killed(model, sae, dataset, cfg, **kwargs):
        calls.append(kwargs["sparsity"])
        if kwargs["sparsity"] == 0.5:
            raise KeyboardInterrupt("killed")
        return evaluate(model, sae, dataset, cfg, **kwargs)

    monkeypatch.setattr(latents, "evaluate_layer", killed)
    with pytest.raises(KeyboardInterrupt):
        run_level(level(models, data), config, tmp_path)
    first = tmp_path / "sparsity_0" / "sae.json"
    saved = (first.read_bytes(), first.stat().st_mtime_ns)
    assert not (tmp_path / "sparsity_0.5" / "sae.json").exists()
    assert (tmp_path / "sparsity_0.5" / "blocks.0.hook_resid_post-all-k4-x2" / "training.json").is_file()
    monkeypatch.setattr(latents, "evaluate_layer", evaluate)

    result = run_level(level(models, data), config, tmp_path)
    assert (first.read_bytes(), first.stat().st_mtime_ns) == saved
    assert json.loads((tmp_path / "sparsity_0.5" / "sae.json").read_text())["record"]["loaded"] is True
    _, reference = finished
    assert result.quality == reference.quality and result.rows == reference.rows
    assert result.latents == reference.latents


def test_sweep_units_reuse_the_main_sae_and_write_the_sweep_table(models, data, config, finished):
    """The sweep (Tables 5/6) adds units to a finished run: the main SAE units are kept (the sweep
    settings do not change them), the base row is the main SAE's quality."""
    import dataclasses

    from analyses.common.level import run_level
    from analyses.layer import Layer

    tmp_path, reference = finished
    swept = dataclasses.replace(config, sweep_k=(2,), sweep_tokens=("all", "cls"))
    assert Layer().units(swept) == ["sae", "sweep/blocks.0.hook_resid_post-all-k2-x2",
                                    "sweep/blocks.0.hook_resid_post-cls-k4-x2"]
    before = (tmp_path / "sparsity_0" / "sae.json").read_bytes()
    result = run_level(level(models, data), swept, tmp_path)
    assert (tmp_path / "sparsity_0" / "sae.json").read_bytes() == before
    assert result.quality == reference.quality
    assert [(r["model"], r["tokens"], r["k"]) for r in result.sweep] == [
        ("dense", "all", 4), ("dense", "all", 2), ("dense", "cls", 4),
        ("magnitude 0.5", "all", 4), ("magnitude 0.5", "all", 2), ("magnitude 0.5", "cls", 4)]
    base = result.sweep[0]
    assert base["fve"] == reference.quality[0]["explained_variance"] and base["d_sae"] == 64
    assert result.sweep[2]["n_tokens"] == 24 and result.sweep[1]["n_tokens"] == 24 * 17
    for name in ("sweep.csv", "sweep.md", "result.json"):
        assert (tmp_path / "sweep" / name).is_file(), name
    assert "| dense | cls | 4 | 2 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert (tmp_path / "sparsity_0.5" / "blocks.0.hook_resid_post-cls-k4-x2" / "cfg.json").is_file()


def test_layer_command(tmp_path, capsys):
    from hooked_vit.cli import main

    out = tmp_path / "run"
    args = ["layer", "--model", "deit3_tiny_digits", "--sparsities", "0", "--sae.k", "4", "--sae.expansion-factor", "2",
            "--train-split", "val", "--sae.training-samples", "2048", "--sae.train-batch-size", "256",
            "--sae.n-checkpoints", "1", "--sae.log-every", "4", "--top-k", "3", "--classes", "0,1",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "/ 192 (0." in printed  # dead latents: count of d_sae and fraction
    sae_dir = out / "sparsity_0" / "last_resid_post-cls-k4-x2"
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert json.loads((out / "sparsity_0" / "sae.json").read_text())["record"]["training"]["steps"] == 8
    rows = (out / "quality.csv").read_text()
    assert "n_tokens" in rows and ",360," in rows  # the 360 held-out CLS tokens are the dead-latent window
    assert main(args) == 0 and "| dense |" in capsys.readouterr().out  # done: the saved result
    assert main(["layer", "--sae.k", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "k must be positive" in capsys.readouterr().err and not (tmp_path / "bad").exists()
