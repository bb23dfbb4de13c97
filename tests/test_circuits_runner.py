"""The circuit-level runner and CLI on the embedded deit3_tiny_digits: Tables 3 and 7, figures, the
random-weight control, resume after an interrupted run, refusing a different config, bad options,
and (slow) the quick protocol's quality."""

from __future__ import annotations

import argparse

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
    """Models for the runner: the embedded model, Wanda-pruned on 64 train images at sparsity > 0."""

    def load(config, sparsity):
        from hooked_vit import HookedViT
        from hooked_vit.pruning import prune

        if fail_at is not None and sparsity == fail_at:
            raise KeyboardInterrupt  # the run is killed while loading this model
        if calls is not None:
            calls.append(sparsity)
        model = HookedViT.from_pretrained(config.model)
        if sparsity:
            prune(model, config.method, sparsity, calibration=train.tensors(show_progress=False)[0][:64])
        return model

    return load


def random_loader(config):
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained(config.model, pretrained=False, seed=config.seed)


def test_runner_tables_figures_control_and_resume(digits_data, tmp_path, monkeypatch):
    import analyses.circuits.runner as runner
    from analyses.circuits import CircuitConfig, CircuitResult, run_circuits
    from analyses.common.ablation import model_key
    from analyses.common.results import read_csv

    train, val = digits_data
    out = tmp_path / "run"
    config = CircuitConfig(sparsities=(0.0, 0.5), sweep_k=(1e-3, 3e-3), random_control=True, **SETTINGS)
    kwargs = dict(train=train, val=val, random_loader=random_loader, show_progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed after the dense model's circuits
        run_circuits(config, out, model_loader=loader(train, fail_at=0.5), **kwargs)
    assert sorted(p.parent.name for p in (out / "sparsity_0").glob("k_*/class_*/circuit.json")) == [
        "class_0", "class_0", "class_1", "class_1"]
    assert not (out / "table3.csv").exists()

    found: list[tuple[str, list[int]]] = []
    original = runner.discover_circuits

    def counting(model, train_, chunk, config_, **kw):
        found.append((model_key(model), list(chunk)))
        return original(model, train_, chunk, config_, **kw)

    monkeypatch.setattr(runner, "discover_circuits", counting)
    result = run_circuits(config, out, model_loader=loader(train), **kwargs)
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
    again = run_circuits(config, out, model_loader=loader(train), **kwargs)
    assert found == [] and again.rows == result.rows

    # A different setting refuses the directory and names the field.
    with pytest.raises(ValueError, match=r"different config \(steps: 3 there, 4 now\)"):
        run_circuits(CircuitConfig(sparsities=(0.0,), **{**SETTINGS, "steps": 4}), out,
                     model_loader=loader(train), **kwargs)


def parser():
    from analyses.circuits.cli import add_arguments

    p = argparse.ArgumentParser(prog="hooked-vit circuits")
    add_arguments(p)
    return p


@pytest.mark.parametrize("argv, message", [
    (["--k", "-1"], "argument --k: must be a number >= 0; got '-1'"),
    (["--steps", "0"], "argument --steps: must be a whole number >= 1; got '0'"),
    (["--sparsities", "0,1.5"], "argument --sparsities: each sparsity must be in [0, 1)"),
    (["--sweep-k", "1e-3,abc"], "argument --sweep-k: must be comma-separated numbers"),
    (["--sweep-k", "1e-3,-2"], "argument --sweep-k: each k must be a number >= 0; got -2"),
    (["--loss", "mse"], "argument --loss: invalid choice: 'mse'"),
    (["--classes", "-2"], "argument --classes: class indices must be >= 0"),
    (["--batch-size", "2.5"], "argument --batch-size: must be a whole number >= 1; got '2.5'"),
])
def test_cli_rejects_bad_options_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # argparse: one error line, exit code 2, while parsing
        parser().parse_args([*argv, "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"hooked-vit circuits: error: {message}"), last
    assert not (tmp_path / "x").exists()


def test_cli_unknown_class_is_an_error_before_training(tmp_path):
    from analyses.circuits.cli import main

    with pytest.raises(ValueError, match=r"class index 11 out of range \[0, 10\)"):
        main(parser().parse_args(["--sparsities", "0", "--classes", "11", "--out", str(tmp_path / "x"),
                                  "--no-progress"]))
    assert not (tmp_path / "x").exists()  # nothing written


def test_cli_runs_and_prints_table3(tmp_path, capsys):
    from analyses.circuits.cli import main

    out = tmp_path / "cli"
    argv = ["--sparsities", "0", "--classes", "0,3", "--steps", "2", "--batch-size", "4", "--n-eval", "5",
            "--n-means-images", "100", "--out", str(out), "--no-progress"]
    assert main(parser().parse_args(argv)) == 0
    text = capsys.readouterr().out
    assert "| dense | 0.001 | 2 |" in text and "Ablated acc. (%)" in text
    assert (out / "table3.csv").is_file() and len(list(out.glob("sparsity_0/k_0.001/class_*/nodes.safetensors"))) == 2


def test_cli_module_imports_only_the_standard_library():
    import subprocess
    import sys

    code = ("import sys; import analyses.circuits.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'jaxtyping'}), "
            "sorted(m for m in sys.modules if m.startswith(('hooked_vit', 'analyses'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ("[] ['analyses', 'analyses.circuits', 'analyses.circuits.cli', 'analyses.common', "
                                  "'analyses.common.defaults', 'hooked_vit', 'hooked_vit.cli_args', 'hooked_vit.errors']")


@pytest.mark.slow
def test_quick_protocol_finds_faithful_small_circuits(tmp_path):
    """The quick setting on the dense embedded model: small circuits, accuracy near the full model's,
    complement near chance (several minutes on CPU)."""
    from analyses.circuits import CircuitConfig, run_circuits

    result = run_circuits(CircuitConfig(sparsities=(0.0,), classes=(0, 3, 7), steps=100, batch_size=16, lr=6e-2),
                          tmp_path / "quick", show_progress=False)
    row = result.table3()[0]
    assert row["node_frac_mean"] < 0.25
    assert row["acc_full_mean"] - row["acc_mean"] < 0.1
    assert row["acc_ablated_mean"] < 0.7


def test_cli_constants_agree_with_the_config():
    from analyses.circuits import cli, config

    assert (cli.LOSSES, cli.SCHEDULES, cli.REFERENCES) == (config.LOSSES, config.SCHEDULES, config.REFERENCES)
    assert cli.DEFAULT_MODEL == config.DEFAULT_MODEL
    assert cli.DEFAULT_SPARSITIES == config.DEFAULT_SPARSITIES
    defaults = config.CircuitConfig()
    assert (int(cli.FULL["steps"]), int(cli.FULL["batch_size"]), float(cli.FULL["lr"])) == (
        defaults.steps, defaults.batch_size, defaults.lr)
