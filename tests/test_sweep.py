"""The accuracy-vs-sparsity sweep (``hooked-vit sweep-sparsity``): result files carrying their
settings, resume, and the CLI, on the embedded digits architecture with random weights."""

from __future__ import annotations

import csv
import json

import pytest


@pytest.fixture(scope="module")
def digits_model_dir(tmp_path_factory):
    """The embedded digits architecture with random weights, saved (dataset "digits")."""
    from hooked_vit import HookedViT
    from hooked_vit.data import DIGITS_PREPROCESSING
    from hooked_vit.training import build_default_model

    model = HookedViT.from_timm(build_default_model(seed=1), model_name="digits_sweep", dataset="digits",
                                preprocessing=dict(DIGITS_PREPROCESSING))
    return model.save_pretrained(tmp_path_factory.mktemp("models") / "digits_sweep")


@pytest.fixture
def small_splits(monkeypatch):
    """The sweep sees the first 192 train and 96 val digits (keeps the tests fast)."""
    from hooked_vit.data import load_dataset
    from hooked_vit.pruning import sweep

    def load_small(source, split, *, model):
        return load_dataset(source, split, model=model).subset(range(192 if split == "train" else 96))

    monkeypatch.setattr(sweep, "load_dataset", load_small)
    return load_small


def read_csv(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    return json.loads(lines[0][2:]), list(csv.DictReader(lines[1:]))


def test_sweep_results_settings_and_resume(digits_model_dir, small_splits, tmp_path, monkeypatch):
    from PIL import Image

    from hooked_vit import HookedViT
    from hooked_vit.evaluation import evaluate
    from hooked_vit.pruning import prune as real_prune
    from hooked_vit.pruning import sweep

    config = sweep.SweepConfig(model=str(digits_model_dir), methods=("magnitude", "wanda"),
                               sparsities=(0.0, 0.5, 0.9), n_calib=32, finetune_epochs=0, calib_sampling="quick")
    calls = []

    def counting_prune(model, method, sparsity, **kwargs):
        calls.append((method, sparsity))
        return real_prune(model, method, sparsity, **kwargs)

    monkeypatch.setattr(sweep, "prune", counting_prune)
    rows = sweep.run_sweep(config, tmp_path, progress=False)
    assert sorted(calls) == [("magnitude", 0.5), ("magnitude", 0.9), ("wanda", 0.5), ("wanda", 0.9)]
    assert sorted((r["method"], r["sparsity"]) for r in rows) == [
        (m, s) for m in ("magnitude", "wanda") for s in (0.0, 0.5, 0.9)]

    dense = HookedViT.from_pretrained(digits_model_dir)
    expected = evaluate(dense, small_splits("digits", "val", model=dense), progress=False)
    header, csv_rows = read_csv(tmp_path / "sweep.csv")
    assert header["sweep"]["n_calib"] == 32 and header["sweep"]["model"] == str(digits_model_dir)
    by_key = {(r["method"], float(r["sparsity"])): r for r in csv_rows}
    for method in ("magnitude", "wanda"):
        assert float(by_key[(method, 0.0)]["top1"]) == expected["top1"]
        assert float(by_key[(method, 0.0)]["top5"]) == expected["top5"]
        for s in (0.5, 0.9):
            # 96 inputs -> int(96 s), 384 inputs (fc2) -> int(384 s) zeros per row
            assert abs(float(by_key[(method, s)]["overall_sparsity"]) - s) < 0.01
    markdown = (tmp_path / "sweep.md").read_text()
    assert "| Method | Metric | 0.0 (Dense) | 0.5 | 0.9 |" in markdown
    assert f"| Magnitude (per layer) | Top-1 | {expected['top1']:.4f} |" in markdown and '"n_calib": 32' in markdown
    with Image.open(tmp_path / "sweep.png") as png:
        assert json.loads(png.text["Description"])["sweep"]["sparsities"] == [0.0, 0.5, 0.9]
    saved = json.loads((tmp_path / "results" / "wanda_0.9.json").read_text())
    assert saved["settings"]["n_calib"] == 32 and saved["result"]["top1"] == float(by_key[("wanda", 0.9)]["top1"])

    calls.clear()  # resume: everything is on disk, nothing is recomputed
    assert sweep.run_sweep(config, tmp_path, progress=False) == rows and calls == []
    (tmp_path / "results" / "wanda_0.5.json").unlink()  # an interrupted sweep: only the missing one runs
    again = sweep.run_sweep(config, tmp_path, progress=False)

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]

    assert calls == [("wanda", 0.5)] and untimed(again) == untimed(rows)  # deterministic recomputation
    calls.clear()  # other settings: stale results are not reused
    changed = sweep.SweepConfig(**{**config.__dict__, "n_calib": 16, "sparsities": (0.5,)})
    sweep.run_sweep(changed, tmp_path, progress=False)
    assert sorted(calls) == [("magnitude", 0.5), ("wanda", 0.5)]


def test_markdown_table_has_the_paper_layout():
    from hooked_vit.pruning.sweep import markdown_table

    rows = [{"method": m, "sparsity": s, "top1": t1, "top5": t5}
            for m, s, t1, t5 in [("magnitude", 0.0, 0.8371, 0.9655), ("magnitude", 0.7, 0.8026, 0.9498),
                                 ("wanda", 0.0, 0.8371, 0.9655), ("wanda", 0.7, 0.8044, 0.9510)]]
    assert markdown_table(rows, (0.0, 0.7)).splitlines() == [
        "| Method | Metric | 0.0 (Dense) | 0.7 |",
        "|---|---|---:|---:|",
        "| Magnitude (per layer) | Top-1 | 0.8371 | 0.8026 |",
        "|  | Top-5 | 0.9655 | 0.9498 |",
        "| Wanda | Top-1 | 0.8371 | 0.8044 |",
        "|  | Top-5 | 0.9655 | 0.9510 |",
    ]


def test_cli_sweep_with_finetuning(digits_model_dir, small_splits, tmp_path, capsys):
    from hooked_vit.cli import main

    out = tmp_path / "sweep"
    code = main(["sweep-sparsity", "--model", str(digits_model_dir), "--methods", "wanda", "--sparsities", "0,0.7",
                 "--finetune-epochs", "1", "--finetune-batch-size", "64", "--n-calib", "16", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Wanda | Top-1 |" in printed and "sweep.csv" in printed
    header, rows = read_csv(out / "sweep.csv")
    assert header["sweep"]["finetune_epochs"] == 1 and header["sweep"]["finetune_batch_size"] == 64
    tuned = next(r for r in rows if float(r["sparsity"]) == 0.7)
    assert float(tuned["finetune_seconds"]) > 0 and abs(float(tuned["overall_sparsity"]) - 0.7) < 0.01
    assert {p.name for p in out.iterdir()} == {"results", "sweep.csv", "sweep.md", "sweep.png", "sweep.json"}

    assert main(["sweep-sparsity", "--model", str(digits_model_dir), "--sparsities", "0,1.5", "--out", str(out)]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_sweep_defaults_come_from_the_model_preset():
    """Table 1 is fine-tuned by default, for the preset's epochs (the paper's 2 for DeiT-III), and
    calibrated as the preset says (Wanda's 4,096 augmented draws for ImageNet models)."""
    from hooked_vit.pruning.sweep import SweepConfig, resolve_protocol

    embedded = resolve_protocol(SweepConfig())
    assert (embedded.finetune_epochs, embedded.n_calib, embedded.calib_sampling) == (2, 128, "quick")
    paper = resolve_protocol(SweepConfig(model="deit3_base"))
    assert (paper.finetune_epochs, paper.n_calib, paper.calib_sampling) == (2, 4096, "reference")
    explicit = resolve_protocol(SweepConfig(model="deit3_base", finetune_epochs=0, n_calib=128))
    assert (explicit.finetune_epochs, explicit.n_calib, explicit.calib_sampling) == (0, 128, "reference")
