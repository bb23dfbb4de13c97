"""The neuron level (analyses.neuron, run by the driver analyses.common.level.run_level) on the
embedded deit3_tiny_digits: outputs and their reload, per-class numbers recomputed independently
(top-K by attribution, ablation impact, selectivity), resume after an interruption, the CLI, and
clear errors."""

from __future__ import annotations

import math

import pytest
import torch

CLASSES = (0, 3, 7)


@pytest.fixture(scope="module")
def digits_model():
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained("deit3_tiny_digits")


@pytest.fixture(scope="module")
def digits_val(digits_model):
    """150 validation images, 15 per class (the analysed images)."""
    from hooked_vit.data import calibration_sample, load_dataset

    return calibration_sample(load_dataset("digits", split="val", model=digits_model), 150, seed=0)


@pytest.fixture(scope="module")
def digits_train(digits_model):
    """200 train images (the ablation means)."""
    from hooked_vit.data import calibration_sample, load_dataset

    return calibration_sample(load_dataset("digits", split="train", model=digits_model), 200, seed=0)


def loader(calibration):
    """Models for the driver: the dense embedded model, or it Wanda-pruned on ``calibration``
    (a small dataset, for speed; not cached)."""

    def load(config, variant):
        from hooked_vit import HookedViT
        from hooked_vit.pruning import prune

        model = HookedViT.from_pretrained(config.model)
        if variant.sparsity:
            prune(model, config.method, variant.sparsity, calibration=calibration.tensors(show_progress=False)[0])
        return model

    return load


def level(digits_val, digits_train, model_loader=None):
    """The neuron level on the given images (val analysed, train for the means)."""
    from analyses.neuron import Neuron

    return Neuron(show_progress=False, model_loader=model_loader or loader(digits_train),
                  datasets={"val": digits_val, "train": digits_train})


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_val, digits_train):
    from analyses.common.level import run_level
    from analyses.neuron import NeuronConfig

    out = tmp_path_factory.mktemp("neuron_level")
    config = NeuronConfig(classes=CLASSES, top_k=8, sparsities=(0.0, 0.5))
    result = run_level(level(digits_val, digits_train), config, out)
    return config, out, result


def test_config_is_light():
    import subprocess
    import sys

    code = "import sys, analyses.neuron; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_blocks():
    from analyses.neuron.analysis import default_blocks

    assert default_blocks(12) == (2, 7, 11)  # the paper's blocks of DeiT-III B
    assert default_blocks(4) == (1, 2, 3)  # the embedded model
    assert default_blocks(24) == (4, 15, 23)
    assert default_blocks(2) == (0, 1) and default_blocks(1) == (0,)


def test_runner_writes_tables_figure_and_reloads(run):
    from analyses.common.results import read_csv
    from analyses.common.vocabulary import METRICS
    from analyses.neuron import NeuronResult

    config, out, result = run
    for name in ("result.json", "per_class.csv", "summary.csv", "summary.md", "figure.png"):
        assert (out / name).is_file(), name
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sparsity_0.5" / "classes" / "7.json").is_file()
    assert result.blocks == [1, 2, 3] and result.sparsities == [0.0, 0.5]
    assert len(result.rows) == 2 * len(CLASSES) * 3
    for row in result.rows:
        assert all(math.isfinite(row[m]) for m in METRICS)
        assert 0 <= row["selectivity"] <= 1 and 0 <= row["label_entropy"] <= math.log(10) + 1e-6
        assert row["class_variance"] >= 0
    loaded = NeuronResult.load(out)
    assert loaded.config == config and loaded.rows == result.rows
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 3 * 2 and {r["n_classes"] for r in summary} == {len(CLASSES)}
    assert "| block | sparsity |" in (out / "summary.md").read_text()
    # The pruned model differs from the dense one, so do its numbers.
    dense = [r["ablation"] for r in result.rows if r["sparsity"] == 0.0]
    pruned = [r["ablation"] for r in result.rows if r["sparsity"] == 0.5]
    assert dense != pruned


def test_class_numbers_recomputed_independently(run, digits_model, digits_val, digits_train):
    """Class 3, block 2 of the dense model: top-K = largest mean estimated logit drop over the
    mlp_act neurons and heads; ablation impact and selectivity recomputed from scratch."""
    from sklearn.metrics import roc_auc_score

    from analyses.common.ablation import load_or_compute_means, mean_ablation_hooks
    from analyses.common.attribution_patching import attribution_patching
    from analyses.common.results import read_json

    _, out, _ = run
    record = read_json(out / "sparsity_0" / "classes" / "3.json")["record"]["blocks"]["2"]
    means = load_or_compute_means(digits_model, digits_train, directory=out / "means", show_progress=False)
    images, labels = digits_val.tensors(show_progress=False)
    own = images[labels == 3]
    est = attribution_patching(digits_model, own, [(2, "mlp_act"), (2, "attn_head")], targets=3,
                               means=means).estimates
    drop = torch.cat([-est["blocks.2.mlp.hook_post"].mean(0), -est["blocks.2.attn.hook_z"].mean(0)])
    names = [f"mlp_act:{i}" for i in range(384)] + [f"attn_head:{h}" for h in range(4)]
    expected = [names[i] for i in drop.argsort(descending=True)[:8].tolist()]
    assert record["units"] == expected
    assert record["scores"] == pytest.approx(sorted(drop.tolist(), reverse=True)[:8], rel=1e-4, abs=1e-6)

    units = {"blocks.2.mlp.hook_post": [], "blocks.2.attn.hook_z": []}
    for unit in record["units"]:
        kind, index = unit.split(":")
        units["blocks.2.mlp.hook_post" if kind == "mlp_act" else "blocks.2.attn.hook_z"].append(int(index))
    with torch.no_grad():
        clean = digits_model(own)
        ablated = digits_model.run_with_hooks(own, fwd_hooks=mean_ablation_hooks(
            digits_model, {k: v for k, v in units.items() if v}, means))
    impact = ((clean[:, 3] - ablated[:, 3]) / clean.norm(dim=1)).mean()
    assert record["ablation"] == pytest.approx(float(impact), rel=1e-4, abs=1e-6)

    _, cache = digits_model.run_with_cache(images, names_filter=list(units))
    first = record["units"][0]
    kind, index = first.split(":")
    if kind == "mlp_act":
        cls_act = cache["blocks.2.mlp.hook_post"][:, 0, int(index)]
    else:
        cls_act = cache["blocks.2.attn.hook_z"][:, 0, int(index)].norm(dim=-1)
    auc = roc_auc_score((labels == 3).numpy(), cls_act.numpy())
    assert record["unit_selectivity"][0] == pytest.approx(auc, abs=1e-6)


def test_interrupted_run_resumes_without_recomputing(tmp_path, digits_val, digits_train, monkeypatch):
    import analyses.neuron.analysis as na
    from analyses.common.level import run_level
    from analyses.neuron import NeuronConfig

    config = NeuronConfig(classes=(1, 2, 5, 9), top_k=5, sparsities=(0.0,), blocks=(3,))
    reference = run_level(level(digits_val, digits_train), config, tmp_path / "uninterrupted")

    original = na.ModelAnalysis.class_record
    calls: list[int] = []

    def interrupt_after_two(self, target):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(target)
        return original(self, target)

    monkeypatch.setattr(na.ModelAnalysis, "class_record", interrupt_after_two)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_level(level(digits_val, digits_train), config, out)
    done = sorted((out / "sparsity_0" / "classes").glob("*.json"))
    assert [p.stem for p in done] == ["1", "2"] and not (out / "result.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in done}

    calls.clear()
    monkeypatch.setattr(na.ModelAnalysis, "class_record",
                        lambda self, target: calls.append(target) or original(self, target))
    resumed = run_level(level(digits_val, digits_train), config, out)
    assert calls == [5, 9]  # only the classes not done before
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert resumed.rows == reference.rows
    # A different setting (top_k) recomputes instead of reusing stale records.
    calls.clear()
    run_level(level(digits_val, digits_train), NeuronConfig(classes=(1,), top_k=4, sparsities=(0.0,), blocks=(3,)),
              out)
    assert calls == [1]


def test_cli_neuron(tmp_path, capsys):
    from analyses.common.results import read_csv
    from hooked_vit.cli import main

    out = tmp_path / "cli"
    code = main(["neuron", "--model", "deit3_tiny_digits", "--sparsities", "0", "--classes", "4,6",
                 "--blocks", "3", "--top-k", "6", "--n-means-images", "100", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "Ablation impact" in capsys.readouterr().out
    rows = read_csv(out / "per_class.csv")
    assert [(r["class"], r["block"]) for r in rows] == [(4, 3), (6, 3)]


def test_errors_are_clear(tmp_path, digits_model, digits_val, digits_train):
    from analyses.common.level import run_level
    from analyses.neuron import NeuronConfig

    def run(dataset=digits_val, **config):
        return run_level(level(dataset, digits_train, model_loader=lambda config, variant: digits_model),
                         NeuronConfig(sparsities=(0.0,), **config), tmp_path / "errors")

    with pytest.raises(ValueError, match="unknown class 'eleven'"):
        run(classes=("eleven",))
    with pytest.raises(ValueError, match="has no images"):
        run(dataset=digits_val.select_classes([0, 1]), classes=(2,))
    with pytest.raises(ValueError, match="no images"):
        run(dataset=digits_val.subset([]))
    with pytest.raises(ValueError, match="top_k=500 but the block has 388 units"):
        run(classes=(0,), top_k=500)
    with pytest.raises(ValueError, match="block 4 out of range"):
        run(classes=(0,), blocks=(4,))
    with pytest.raises(ValueError, match="sites must be"):
        NeuronConfig(sites=("mlp",))
    with pytest.raises(ValueError, match="selection"):
        NeuronConfig(selection="largest")
    assert not (tmp_path / "errors").exists()  # every error came before any work


def test_metrics_per_unit_type_split_the_joint_top_k(run, digits_model, digits_val, digits_train):
    """The joint top-K of heads and MLP neurons is kept; ``by_type`` re-averages its per-unit
    metrics over each type's members, and ablates only that type's units (re-derived here)."""
    from analyses.common.ablation import load_or_compute_means, mean_ablation_hooks
    from analyses.common.results import read_json
    from analyses.neuron import NeuronResult

    config, out, result = run
    record = read_json(out / "sparsity_0" / "classes" / "3.json")["record"]
    for block in record["blocks"].values():
        kinds = [u.split(":")[0] for u in block["units"]]
        assert sum(t["n_units"] for t in block["by_type"].values()) == config.top_k
        for site, values in block["by_type"].items():
            members = [i for i, kind in enumerate(kinds) if kind == site]
            assert values["n_units"] == len(members)
            if not members:
                assert values["selectivity"] is None and values["ablation"] is None
                continue
            for metric in ("selectivity", "class_variance", "label_entropy"):
                expected = sum(block[f"unit_{metric}"][i] for i in members) / len(members)
                assert values[metric] == pytest.approx(expected, rel=1e-6)
    # ablation impact of block 2's MLP neurons alone, recomputed with hooks written here
    block = record["blocks"]["2"]
    mlp = [int(u.split(":")[1]) for u in block["units"] if u.startswith("mlp_act:")]
    assert mlp, "premise: the top-K holds MLP neurons"
    means = load_or_compute_means(digits_model, digits_train, directory=out / "means", show_progress=False)
    images, labels = digits_val.tensors(show_progress=False)
    own = images[labels == 3]
    with torch.no_grad():
        clean = digits_model(own)
        ablated = digits_model.run_with_hooks(own, fwd_hooks=mean_ablation_hooks(
            digits_model, {"blocks.2.mlp.hook_post": mlp}, means))
    impact = ((clean[:, 3] - ablated[:, 3]) / clean.norm(dim=1)).mean()
    assert block["by_type"]["mlp_act"]["ablation"] == pytest.approx(float(impact), rel=1e-4, abs=1e-6)
    # tables and markdown carry the split, and it survives a reload
    assert {r["unit_type"] for r in result.type_rows} == set(config.sites)
    assert "MLP neurons" in result.markdown() and "heads" in result.markdown()
    assert NeuronResult.load(out).type_rows == result.type_rows
    assert (out / "summary_by_type.csv").is_file()


def test_analyses_build_fine_tuned_variants_from_an_imagenet_style_folder(tmp_path, monkeypatch):
    """``--data`` an ImageNet-style folder: the analyses' variants are calibrated and fine-tuned on
    its train split, for the preset's epochs (2, as the paper), with no other argument."""
    from PIL import Image

    from analyses.accuracy import AccuracyConfig
    from analyses.common.variants import load_model
    from analyses.neuron import NeuronConfig
    from hooked_vit.data.digits import digits_arrays

    monkeypatch.setenv("HOOKED_VIT_CACHE", str(tmp_path / "cache"))
    images = digits_arrays()[0]
    root = tmp_path / "folder"
    for split, offset in (("train", 0), ("val", 500)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(images[offset + 10 * i + c]).save(root / split / str(c) / f"{i}.png")
    config = NeuronConfig(data=str(root))
    assert (config.finetune_epochs, config.n_calib, config.calib_sampling) == (2, 128, "quick")
    model = load_model(config, 0.5)
    info = model.pruning_info
    assert info.calibration["path"] == str(root.resolve()) and info.calibration["n"] == 30  # its 30 train images
    assert len(info.finetune) == 1 and info.finetune[0]["epochs"] == 2
    assert info.finetune[0]["data"] == {"name": "folder", "split": "train", "len": 30}
    again = load_model(AccuracyConfig(data=str(root)), 0.5)  # another level's config: the same cached variant
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert NeuronConfig(model="deit3_base").finetune_epochs == 2  # the paper's, for DeiT-III
    assert NeuronConfig(data=str(root), finetune_epochs=0).finetune_epochs == 0
