"""The model level (analyses.model, run by the driver analyses.common.level.run_level) and its
subcommand on the embedded deit3_tiny_digits: outputs and their reload, the saved units, per-image
numbers recomputed directly, resume after an interruption, clear errors."""

from __future__ import annotations

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

    def load(config, variant):
        from hooked_vit import HookedViT
        from hooked_vit.pruning import prune

        model = HookedViT.from_pretrained(config.model)
        if variant.sparsity:
            prune(model, config.method, variant.sparsity, calibration=calibration, n_calib=calibration.shape[0])
        return model

    return load


def level(load, digits_val):
    from analyses.model import Model

    return Model(show_progress=False, model_loader=load, datasets={"val": digits_val})


@pytest.fixture(scope="module")
def config():
    from analyses.model import ModelConfig

    return ModelConfig(sparsities=(0.0, 0.5), methods=("chefer", "random"), n_images=N_IMAGES,
                       chunk_size=CHUNK, step=STEP, batch_size=128, figure_classes=(1, 4))


@pytest.fixture(scope="module")
def run(tmp_path_factory, config, digits_val):
    from analyses.common.level import run_level

    calibration = digits_val.tensors(show_progress=False)[0][:32]
    out = tmp_path_factory.mktemp("model_level")
    result = run_level(level(loader(calibration), digits_val), config, out)
    return out, result, loader(calibration)


def test_outputs_and_reload(run, config):
    from analyses.model import ModelResult

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
    loaded = ModelResult.load(out)
    assert loaded == result
    assert json.loads((out / "result.json").read_text())["config"]["methods"] == ["chefer", "random"]


def test_units_are_the_chunks_and_the_figure(run, config, digits_val):
    """One file per image chunk and one for the Figure 4 maps, per model; the result is combined from them."""
    from analyses.common.level import combine_units
    from analyses.model import ModelResult

    out, result, _ = run

    def no_model(config, variant):
        raise AssertionError("combining loads no model")

    for key in ("sparsity_0", "sparsity_0.5"):
        assert sorted(p.name for p in (out / key / "chunks").glob("*.json")) == ["000000.json", "000002.json"]
        saved = json.loads((out / key / "figure" / "1,4.json").read_text())["record"]
        assert saved["maps"] == result.figure["maps"][key.removeprefix("sparsity_")]
    combined = combine_units(level(no_model, digits_val), config, out)  # the saved records alone
    assert isinstance(combined, ModelResult) and combined.rows == result.rows and combined.figure == result.figure


def test_numbers_match_direct_computation(run, config, digits_val, digits_model):
    """The second chunk of the dense model, recomputed with the library functions called directly."""
    from analyses.model.compute import select_images
    from analyses.model.faithfulness import insertion_deletion
    from analyses.model.lrp import random_map, transformer_attribution

    _, result, _ = run
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

    import analyses.model.compute as mc
    from analyses.common.level import run_level

    _, result, load = run
    config = dataclasses.replace(config, sparsities=(0.0,), methods=("random",))  # dense model, 2 chunks
    original = mc.chunk_record
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not resuming:
            raise Killed
        return original(*args, **kwargs)

    resuming = False
    monkeypatch.setattr(mc, "chunk_record", failing)
    with pytest.raises(Killed):
        run_level(level(load, digits_val), config, tmp_path)
    finished = sorted((tmp_path / "sparsity_0" / "chunks").glob("*.json"))
    assert len(finished) == 1
    assert not list((tmp_path / "sparsity_0" / "chunks").glob(".*"))  # no half-written file
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished}
    calls.clear()
    resuming = True
    resumed = run_level(level(load, digits_val), config, tmp_path)
    assert len(calls) == 1  # the chunk not saved before the kill
    assert resumed.rows == [r for r in result.rows if r["sparsity"] == 0.0 and r["method"] == "random"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished} == before  # finished units untouched


def test_config_errors():
    from analyses.model import ModelConfig

    for kwargs, needle in [({"methods": ("chefer", "gradcam")}, "gradcam"), ({"reference": "noise"}, "noise"),
                           ({"layerscale_rule": "fold"}, "fold"), ({"sparsities": (0, 1.0)}, "1.0"),
                           ({"n_images": 0}, "n_images"), ({"start_layer": -1}, "start_layer"),
                           ({"chunk_size": 0}, "chunk_size"), ({"batch_size": 0}, "batch_size"),
                           ({"classes": (3, -1)}, "-1")]:
        with pytest.raises(ValueError, match=needle):
            ModelConfig(**kwargs)


def test_data_errors_come_before_any_work(tmp_path, digits_val, run):
    """Too many images or a figure class without images: one-line errors before a unit is computed."""
    from analyses.common.level import run_level
    from analyses.model import ModelConfig

    _, _, load = run
    for kwargs, needle in [({"n_images": 10_000}, "n_images=10000"),
                           ({"classes": (1, 2), "figure_classes": (5,)}, "figure class")]:
        with pytest.raises(ValueError, match=needle):
            run_level(level(load, digits_val), ModelConfig(sparsities=(0.0,), **kwargs), tmp_path / needle[:6])
        assert not list((tmp_path / needle[:6]).rglob("*.json"))


# ----------------------------------------------------------------------------- command line
def test_cli_runs_and_prints_table(tmp_path, capsys):
    from hooked_vit.cli import main

    argv = ["model", "--sparsities", "0", "--methods", "rollout,random", "--n-images", "4", "--chunk-size", "4",
            "--step", "256", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rollout" in printed and "Insertion" in printed and (tmp_path / "table4.md").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "chefer,gradcam"], "gradcam"),
    (["--reference", "noise"], "noise"),
    (["--layerscale-rule", "fold"], "fold"),
    (["--sparsities", "0,1.5"], "1.5"),
    (["--n-images", "0"], "n_images"),
    (["--start-layer", "-1"], "start_layer"),
])
def test_cli_rejects_bad_arguments_before_any_work(argv, needle, capsys, tmp_path):
    from hooked_vit.cli import main

    assert main(["model", *argv, "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "error:" in message[0] and needle in message[0]
    assert not (tmp_path / "out").exists()


def test_config_module_is_light_and_names_the_real_constants():
    code = "import sys, analyses.model.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    import dataclasses

    from analyses.model import ModelConfig
    from analyses.model.config import ATTRIBUTION_METHODS
    from analyses.model.faithfulness import REFERENCES
    from analyses.model.lrp import LAYERSCALE_RULES, METHODS

    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(ModelConfig)}
    assert tuple(METHODS) == ATTRIBUTION_METHODS and choices["methods"] is ATTRIBUTION_METHODS
    assert choices["reference"] is REFERENCES and choices["layerscale_rule"] is LAYERSCALE_RULES


@pytest.mark.slow
def test_quick_table4_on_digits(tmp_path):
    """The quick setting of the README: 100 stratified val images, 5 models, chefer + rollout + random."""
    from analyses.common.level import run_level
    from analyses.model import Model, ModelConfig

    result = run_level(Model(show_progress=False), ModelConfig(n_images=100), tmp_path)
    table = {(r["sparsity"], r["method"]): r for r in result.summary()}
    assert table[(0.0, "chefer")]["insertion_mean"] > table[(0.0, "random")]["insertion_mean"]
    assert table[(0.0, "chefer")]["deletion_mean"] < table[(0.0, "random")]["deletion_mean"]
