"""The hooked-vit command line: evaluate, info, train-default and the subcommand registry."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def cli():
    import hooked_vit.cli as cli

    return cli


def test_evaluate_prints_a_table_and_json(cli, capsys):
    assert cli.main(["evaluate", "--model", "deit3_tiny_digits", "--data", "builtin", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "deit3_tiny_digits"]
    assert lines[1].startswith("data") and "digits/val (360 images, 10 classes)" in lines[1]
    assert lines[2].startswith("top-1") and lines[3].startswith("top-5") and lines[4].startswith("loss")
    report = json.loads(lines[-1])
    assert report["model"] == "deit3_tiny_digits" and report["data"] == "digits" and report["split"] == "val"
    assert report["n"] == 360 and report["top1"] >= 0.97 and report["top5"] >= report["top1"]


def test_evaluate_reports_bad_data_as_an_error(cli, capsys):
    assert cli.main(["evaluate", "--data", "/no/such/folder", "--batch-size", "8"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hooked-vit evaluate: error: argument --data: unknown dataset source '/no/such/folder'")
    assert len(error.strip().splitlines()) == 1


def test_info_prints_the_model_summary(cli, capsys):
    assert cli.main(["info", "--model", "deit3_tiny_digits"]) == 0
    out = capsys.readouterr().out
    assert "deit3_tiny_digits" in out and "hook_pooled" in out


def test_train_default_writes_loadable_files(cli, capsys, tmp_path):
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    assert cli.main(["train-default", "--seed", "1", "--epochs", "1", "--n-train", "64", "--n-val", "20",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "on 20 images" in out
    spec = json.loads((tmp_path / "deit3_tiny_digits.json").read_text())
    assert spec["training"]["command"] == \
        f"hooked-vit train-default --seed 1 --epochs 1 --n-train 64 --n-val 20 --out {tmp_path}"
    assert spec["training"]["epochs"] == 1 and 0.0 <= spec["training"]["val_top1"] <= 1.0
    VisionTransformer(**spec["timm_kwargs"]).load_state_dict(load_file(tmp_path / spec["weights_file"]))


def test_subcommands_come_from_a_registry(cli, capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))

    def configure(parser):
        parser.add_argument("--times", type=int, default=1)

    @cli.subcommand("hello", "say hello", configure=configure)
    def hello(args):
        print("hello " * args.times)
        return 0

    assert cli.main(["hello", "--times", "2"]) == 0 and capsys.readouterr().out.split() == ["hello", "hello"]
    with pytest.raises(ValueError, match="already registered"):
        cli.subcommand("hello", "again")(hello)
    assert {"info", "train-default", "evaluate"} <= set(cli.SUBCOMMANDS)
