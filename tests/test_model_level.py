"""The model-level runner (analyses.model.level) and its CLI on the embedded deit3_tiny_digits: outputs
and their reload, per-image numbers recomputed directly, resume after an interruption, clear errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

N_IMAGES, CHUNK, STEP = 4, 2, 256  # 4 insertion/deletion steps per curve: fast


@pytest.fixture(scope="module")
def digits_model():
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained("deit3_tiny_digits")


@pytest.fixture(scope="module")
def digits_val(digits_model):
    from hooked_vit.data import load_dataset

    return load_dataset("digits", split="val", model=digits_model)


def loader(calibration):
    """Dense embedded model, or it Wanda-pruned on ``calibration`` (small, not cached)."""

    def load(config, sparsity):
        from hooked_vit import HookedViT
        from hooked_vit.pruning import prune

        model = HookedViT.from_pretrained(config.model)
        if sparsity:
            prune(model, config.method, sparsity, calibration=calibration, n_calib=calibration.shape[0])
        return model

    return load


@pytest.fixture(scope="module")
def config():
    from analyses.model.level import ModelLevelConfig

    return ModelLevelConfig(sparsities=(0.0, 0.5), methods=("chefer", "random"), n_images=N_IMAGES,
                            chunk_size=CHUNK, step=STEP, batch_size=128, figure_classes=(1, 4))


@pytest.fixture(scope="module")
def run(tmp_path_factory, config, digits_val):
    from analyses.model.level import run_model_level

    calibration = digits_val.tensors(show_progress=False)[0][:32]
    out = tmp_path_factory.mktemp("model_level")
    result = run_model_level(config, out, model_loader=loader(calibration), dataset=digits_val, show_progress=False)
    return out, result, loader(calibration)


def test_outputs_and_reload(run, config):
    from analyses.model.level import ModelLevelResult

    out, result, _ = run
    for name in ("result.json", "table4.csv", "table4.md", "per_image.csv", "figure4.png", "curves.png"):
        assert (out / name).is_file(), name
    assert len(result.rows) == 2 * 2 * N_IMAGES
    table = result.summary()
    assert [(r["sparsity"], r["method"]) for r in table] == [(0.0, "chefer"), (0.0, "random"), (0.5, "chefer"),
                                                             (0.5, "random")]
    assert all(r["n_images"] == N_IMAGES and 0 <= r["insertion_mean"] <= 1 for r in table)
    assert "chefer" in (out / "table4.md").read_text() and "± " in (out / "table4.md").read_text()
    assert len(result.figure["maps"]["0.5"]) == 2 and len(result.figure["maps"]["0.5"][0]) == 8  # 2 rows, 8x8 grid
    assert len(result.curves["0"]["chefer"]["insertion"]) == 5  # 32 x 32 pixels, 256 per step
    loaded = ModelLevelResult.load(out)
    assert loaded == result
    assert json.loads((out / "result.json").read_text())["config"]["methods"] == ["chefer", "random"]


def test_numbers_match_direct_computation(run, config, digits_val, digits_model):
    """The second chunk of the dense model, recomputed with the library functions called directly."""
    from analyses.model.faithfulness import insertion_deletion
    from analyses.model.lrp import random_map, transformer_attribution
    from analyses.model.level import select_images

    out, result, _ = run
    model = digits_model
    images = select_images(digits_val, config).subset([2, 3]).tensors(show_progress=False)[0]
    chefer = insertion_deletion(model, images, transformer_attribution(model, images), "zero", step=STEP)
    random = insertion_deletion(model, images, random_map(model, images, seed=config.seed + 2), "zero", step=STEP)
    rows = {(r["method"], r["image"]): r for r in result.rows if r["sparsity"] == 0.0}
    for i in range(2):
        assert rows[("chefer", 2 + i)]["insertion"] == pytest.approx(float(chefer.insertion_auc[i]), abs=1e-6)
        assert rows[("chefer", 2 + i)]["deletion"] == pytest.approx(float(chefer.deletion_auc[i]), abs=1e-6)
        assert rows[("random", 2 + i)]["deletion"] == pytest.approx(float(random.deletion_auc[i]), abs=1e-6)


class Killed(Exception):
    """Stands for a kill in the middle of a run."""


def test_resume_after_interruption(tmp_path, config, digits_val, run, monkeypatch):
    import dataclasses

    import analyses.model.level as ml

    _, result, load = run
    config = dataclasses.replace(config, sparsities=(0.0,), methods=("random",))  # dense model, 2 chunks
    original = ml.chunk_record
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not resuming:
            raise Killed
        return original(*args, **kwargs)

    resuming = False
    monkeypatch.setattr(ml, "chunk_record", failing)
    with pytest.raises(Killed):
        ml.run_model_level(config, tmp_path, model_loader=load, dataset=digits_val, show_progress=False)
    assert len(list((tmp_path / "sparsity_0" / "chunks").glob("*.json"))) == 1
    assert not list((tmp_path / "sparsity_0" / "chunks").glob(".*"))  # no half-written file
    calls.clear()
    resuming = True
    resumed = ml.run_model_level(config, tmp_path, model_loader=load, dataset=digits_val, show_progress=False)
    assert len(calls) == 1  # the chunk not saved before the kill
    assert resumed.rows == [r for r in result.rows if r["sparsity"] == 0.0 and r["method"] == "random"]


def test_config_errors():
    from analyses.model.level import ModelLevelConfig

    for kwargs, needle in [({"methods": ("chefer", "gradcam")}, "gradcam"), ({"reference": "noise"}, "noise"),
                           ({"layerscale_rule": "fold"}, "fold"), ({"sparsities": (0, 1.0)}, "1.0"),
                           ({"n_images": 0}, "n_images")]:
        with pytest.raises(ValueError, match=needle):
            ModelLevelConfig(**kwargs)


# ----------------------------------------------------------------------------- command line
def parser():
    from analyses.model.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_cli_runs_and_prints_table(tmp_path, capsys):
    from analyses.model.cli import main

    args = parser().parse_args(["--sparsities", "0", "--methods", "rollout,random", "--n-images", "4",
                                "--chunk-size", "4", "--step", "256", "--out", str(tmp_path), "--no-progress"])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "rollout" in printed and "Insertion" in printed and (tmp_path / "table4.md").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "chefer,gradcam"], "gradcam"),
    (["--reference", "noise"], "noise"),
    (["--layerscale-rule", "fold"], "fold"),
    (["--sparsities", "0,1.5"], "1.5"),
    (["--n-images", "0"], "--n-images"),
    (["--start-layer", "-1"], "--start-layer"),
])
def test_cli_rejects_bad_arguments_while_parsing(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument" in message and needle in message


def test_cli_module_is_light_and_mirrors_the_library():
    code = "import sys, analyses.model.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from analyses import model_level_cli as cli
    from analyses.model.faithfulness import REFERENCES
    from analyses.model.lrp import LAYERSCALE_RULES, METHODS

    assert cli.METHOD_CHOICES == tuple(METHODS)
    assert cli.REFERENCE_CHOICES == REFERENCES and cli.LAYERSCALE_CHOICES == LAYERSCALE_RULES


@pytest.mark.slow
def test_quick_table4_on_digits(tmp_path):
    """The quick setting of the README: 100 stratified val images, 5 models, chefer + rollout + random."""
    from analyses.model.level import ModelLevelConfig, run_model_level

    result = run_model_level(ModelLevelConfig(n_images=100), tmp_path, show_progress=False)
    table = {(r["sparsity"], r["method"]): r for r in result.summary()}
    assert table[(0.0, "chefer")]["insertion_mean"] > table[(0.0, "random")]["insertion_mean"]
    assert table[(0.0, "chefer")]["deletion_mean"] < table[(0.0, "random")]["deletion_mean"]
