"""The circuit level on the driver and its command, on the embedded deit3_tiny_digits: Tables 3 and 7,
figures, the random-weight control, resume after an interrupted run (killed between models and inside
a unit), refusing a different config, bad options, and (slow) the quick protocol's quality."""

from __future__ import annotations

import json

import pytest

SETTINGS = dict(classes=(0, 1), steps=3, batch_size=4, lr=0.2, n_eval=5)


@pytest.fixture(scope="module")
def digits_data():
    from hooked_vit import HookedViT
    from hooked_vit.data import calibration_sample, load_dataset

    model = HookedViT.from_pretrained("deit3_tiny_digits")
    train = calibration_sample(load_dataset("digits", split="train", model=model), 200, seed=0)
    val = calibration_sample(load_dataset("digits", split="val", model=model), 100, seed=0)
    return train, val


def loader(train, calls: list | None = None, fail_at: float | None = None):
    """Models for the level: the embedded model, Wanda-pruned on 64 train images at sparsity > 0, and
    the random-weight control."""

    def load(config, variant):
        from hooked_vit import HookedViT
        from hooked_vit.pruning import prune

        if variant.key == "random_control":
            return HookedViT.from_pretrained(config.model, pretrained=False, seed=config.seed)
        sparsity = variant.sparsity
        if fail_at is not None and sparsity == fail_at:
            raise KeyboardInterrupt  # the run is killed while loading this model
        if calls is not None:
            calls.append(sparsity)
        model = HookedViT.from_pretrained(config.model)
        if sparsity:
            prune(model, config.method, sparsity, calibration=train.tensors(show_progress=False)[0][:64])
        return model

    return load


def level(train, val, **kwargs):
    from analyses.circuit import Circuit

    return Circuit(show_progress=False, model_loader=loader(train, **kwargs), datasets={"train": train, "val": val})


def test_runner_tables_figures_control_and_resume(digits_data, tmp_path, monkeypatch):
    import analyses.circuit.discovery as discovery
    from analyses.circuit import CircuitConfig, CircuitResult
    from analyses.common.ablation import model_key
    from analyses.common.level import run_level
    from analyses.common.results import read_csv

    train, val = digits_data
    out = tmp_path / "run"
    config = CircuitConfig(sparsities=(0.0, 0.5), sweep_k=(1e-3, 3e-3), random_control=True, **SETTINGS)
    with pytest.raises(KeyboardInterrupt):  # killed after the dense model's circuits
        run_level(level(train, val, fail_at=0.5), config, out)
    assert sorted(p.parent.name for p in (out / "sparsity_0").glob("k_*/class_*/circuit.json")) == [
        "class_0", "class_0", "class_1", "class_1"]
    assert not (out / "table3.csv").exists()

    found: list[tuple[str, list[int]]] = []
    original = discovery.discover_circuits

    def counting(model, train_, chunk, config_, **kw):
        found.append((model_key(model), list(chunk)))
        return original(model, train_, chunk, config_, **kw)

    monkeypatch.setattr(discovery, "discover_circuits", counting)
    result = run_level(level(train, val), config, out)
    dense_key = result.model_keys["dense"]
    # Resumed: the dense circuits are reused; wanda 0.5 and the control train both classes at both k.
    assert [chunk for key, chunk in found] == [[0, 1]] * 4 and dense_key not in {key for key, _ in found}

    labels = ["dense", "wanda 0.5", "random weights"]
    assert [r["model"] for r in result.table3()] == labels
    table3 = read_csv(out / "table3.csv")
    assert [r["model"] for r in table3] == labels and all(r["n_classes"] == 2 for r in table3)
    assert [(r["model"], r["k"]) for r in read_csv(out / "table7.csv")] == [
        (m, k) for m in labels for k in (1e-3, 3e-3)]
    for name in ("table3.md", "table7.md", "per_class.csv", "metrics.png", "heatmap.png", "result.json"):
        assert (out / name).is_file(), name
    assert "Node (%)" in (out / "table3.md").read_text() and "NCQ" in (out / "table3.md").read_text()
    rows = read_csv(out / "per_class.csv")
    assert len(rows) == 3 * 2 * 2
    for r in rows:  # metric relations hold for every saved row
        assert r["ncq"] == pytest.approx(r["acc"] * (1 - r["edge_frac"]))
        assert 0 <= r["node_frac"] <= 1 and 0 <= r["edge_frac"] <= 1
    dense = result.select("dense", 1e-3)
    assert all(r["acc_full"] >= 0.8 for r in dense), [r["acc_full"] for r in dense]  # the model separates each class
    assert CircuitResult.load(out).rows == result.rows

    # A rerun with everything on disk trains nothing and gives the same numbers.
    found.clear()
    again = run_level(level(train, val), config, out)
    assert found == [] and again.rows == result.rows

    # A different setting refuses the directory and names the field.
    with pytest.raises(ValueError, match=r"different config \(steps: 3 there, 4 now\)"):
        run_level(level(train, val), CircuitConfig(sparsities=(0.0,), **{**SETTINGS, "steps": 4}), out)


def test_kill_inside_a_unit_then_resume_gives_the_same_numbers(digits_data, tmp_path, monkeypatch):
    """Killed while computing the first unit of the second class batch: the rerun computes only the
    missing units, leaves the finished unit files untouched and gives the uninterrupted run's numbers."""
    from analyses.circuit import Circuit, CircuitConfig
    from analyses.common.level import run_level

    train, val = digits_data
    config = CircuitConfig(sparsities=(0.0,), sweep_k=(1e-3, 3e-3), **SETTINGS)
    reference = run_level(level(train, val), config, tmp_path / "reference")

    calls: list[str] = []
    original = Circuit.compute

    def killed(self, unit, model, data):
        calls.append(unit)
        if len(calls) == 3:  # k_0.003/class_0: its batch is being trained
            raise KeyboardInterrupt
        return original(self, unit, model, data)

    out = tmp_path / "killed"
    monkeypatch.setattr(Circuit, "compute", killed)
    with pytest.raises(KeyboardInterrupt):
        run_level(level(train, val), config, out)
    monkeypatch.setattr(Circuit, "compute", original)
    finished = {p: p.read_bytes() for p in (out / "sparsity_0").glob("k_*/class_*.json")}
    assert sorted(p.relative_to(out).as_posix() for p in finished) == [
        "sparsity_0/k_0.001/class_0.json", "sparsity_0/k_0.001/class_1.json"]

    calls.clear()
    monkeypatch.setattr(Circuit, "compute", lambda self, unit, model, data: calls.append(unit) or original(
        self, unit, model, data))
    result = run_level(level(train, val), config, out)
    assert calls == ["k_0.003/class_0", "k_0.003/class_1"]  # only the missing units
    assert {p: p.read_bytes() for p in finished} == finished  # finished units untouched

    def numbers(rows):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]

    assert numbers(result.rows) == numbers(reference.rows)
    assert json.loads((out / "sparsity_0" / "k_0.003" / "class_1.json").read_text())["record"]["class"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--k", "-1"], "k=-1.0 is invalid: must be a finite number >= 0"),
    (["--steps", "0"], "steps=0 is invalid: must be a finite number > 0"),
    (["--sparsities", "0,1.5"], "sparsities must lie in [0, 1), got 1.5"),
    (["--sweep-k", "1e-3,abc"], "argument --sweep-k: expected float, got 'abc'"),
    (["--sweep-k", "1e-3,-2"], "sweep_k=(0.001, -2.0) is invalid: must be a non-empty list of finite numbers >= 0"),
    (["--loss", "mse"], "argument --loss: expected one of bce_margin, ce_true_label, got 'mse'"),
    (["--classes", "-2"], "classes=(-2,) is invalid: class indices must be >= 0"),
    (["--batch-size", "2.5"], "argument --batch-size: expected int, got '2.5'"),
])
def test_cli_rejects_bad_options_before_any_work(argv, message, tmp_path, capsys):
    from hooked_vit.cli import main

    assert main(["circuit", *argv, "--out", str(tmp_path / "x")]) == 2  # one error line, exit code 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"hooked-vit circuit: error: {message}"), last
    assert not (tmp_path / "x").exists()


def test_cli_unknown_class_is_an_error_before_training(tmp_path, capsys):
    from hooked_vit.cli import main

    assert main(["circuit", "--sparsities", "0", "--classes", "11", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "class index 11 out of range [0, 10)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written


def test_cli_runs_and_prints_table3(tmp_path, capsys):
    from hooked_vit.cli import main

    out = tmp_path / "cli"
    argv = ["circuit", "--sparsities", "0", "--classes", "0,3", "--steps", "2", "--batch-size", "4", "--n-eval", "5",
            "--n-means-images", "100", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| dense | 0.001 | 2 |" in text and "Ablated acc. (%)" in text
    assert (out / "table3.csv").is_file() and len(list(out.glob("sparsity_0/k_0.001/class_*/nodes.safetensors"))) == 2


def test_config_module_imports_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys; import analyses.circuit.config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'jaxtyping', 'sae_lens', "
            "'sklearn'}), 'hooked_vit.data' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[] False"


def test_report_choice_of_k_comes_from_the_level():
    from analyses.circuit import Circuit, CircuitConfig

    level = Circuit()
    assert level.describe_choice(CircuitConfig(model="deit3_base"), "k") == (
        "model preset: dense `8e-05`, sparse `4e-05`")
    assert level.describe_choice(CircuitConfig(k=2e-3), "k") is None
    assert level.describe_choice(CircuitConfig(), "loss") is None


def test_units_follow_each_model_k(tmp_path):
    """A model's units: one per k it runs at (its preset's, then the swept ones) and class."""
    from analyses.circuit import Circuit, CircuitConfig

    config = CircuitConfig(model="deit3_base", sparsities=(0.0, 0.5), classes=(3, 1, 3), sweep_k=(1e-3,),
                           random_control=True)
    level = Circuit()
    assert [v.key for v in level.variants(config)] == ["sparsity_0", "sparsity_0.5", "random_control"]
    dense, sparse, random = level.variants(config)
    assert level.variant_units(config, dense) == ["k_8e-05/class_3", "k_8e-05/class_1", "k_0.001/class_3",
                                                  "k_0.001/class_1"]
    assert level.variant_units(config, sparse) == ["k_4e-05/class_3", "k_4e-05/class_1", "k_0.001/class_3",
                                                   "k_0.001/class_1"]
    assert level.variant_units(config, random) == level.variant_units(config, dense)


@pytest.mark.slow
def test_quick_protocol_finds_faithful_small_circuits(tmp_path):
    """The quick setting on the dense embedded model: small circuits, accuracy near the full model's,
    complement near chance (several minutes on CPU)."""
    from analyses.circuit import Circuit, CircuitConfig
    from analyses.common.level import run_level

    result = run_level(Circuit(show_progress=False),
                       CircuitConfig(sparsities=(0.0,), classes=(0, 3, 7), steps=100, batch_size=16, lr=6e-2),
                       tmp_path / "quick")
    row = result.table3()[0]
    assert row["node_frac_mean"] < 0.25
    assert row["acc_full_mean"] - row["acc_mean"] < 0.1
    assert row["acc_ablated_mean"] < 0.7
