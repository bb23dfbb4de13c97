"""A new analysis is a level defined in three small pieces: this file defines a toy level (and
nothing outside it changes), then runs it as `hooked-vit impact --levels toy` and as `hooked-vit
toy`-style driver calls: resumed after a kill between units (finished units untouched), shared by
two torchrun processes, combined from the saved records without loading a model, and its config
fields turned into options."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from analyses.common.family import ModelFamily, setting
from analyses.common.level import Level, Record, register_level
from analyses.common.results import AnalysisResult, markdown_table

KILL_AT = "TOY_KILL_AT"  # "<variant>/<unit>": the toy's compute raises there (a kill between units)
UNITS = ("class_0", "class_3", "class_7")


class Killed(RuntimeError):
    """Stands for the process dying between two units."""


@dataclass
class ToyConfig(ModelFamily):
    split: str = setting("val", "split whose images are scored")
    n_images: int = setting(6, "images scored per unit")


@dataclass
class ToyResult(AnalysisResult):
    CONFIG_CLASS: ClassVar[type] = ToyConfig
    config: ToyConfig
    rows: list[dict[str, Any]] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"toy": self.rows}

    def markdown(self) -> str:
        return markdown_table(self.rows)


@register_level("toy")
class Toy(Level):
    title = "Toy"
    paper = "no table"
    unit = "one class of one model"
    Config = ToyConfig
    Result = ToyResult
    open_choices = ("n_images",)

    def units(self, config: ToyConfig) -> list[str]:
        return list(UNITS)

    def prepare(self, config: ToyConfig, model: Any, variant: Any, out: Path) -> dict[str, Any]:
        images, _ = self.dataset(config, config.split, model).subset(range(config.n_images)).tensors(show_progress=False)
        return {"images": images, "variant": variant}

    def compute(self, unit: str, model: Any, data: dict[str, Any]) -> dict[str, Any]:
        import torch

        if os.environ.get(KILL_AT) == f"{data['variant'].key}/{unit}":
            raise Killed(unit)
        target = int(unit.removeprefix("class_"))
        with torch.no_grad():
            logits = model(data["images"])
        return {"class": target, "mean_logit": float(logits[:, target].mean()), "pid": os.getpid()}

    def combine(self, config: ToyConfig, records: list[Record]) -> ToyResult:
        return ToyResult(config, [{"model": r.variant.label, "unit": r.unit, "class": r.record["class"],
                                   "mean_logit": r.record["mean_logit"]} for r in records])


# ----------------------------------------------------------------------------------------- tests
ARGS = ["--levels", "toy", "--sparsities", "0,0.5", "--finetune-epochs", "0", "--n-calib", "32", "--no-progress"]


def impact(out: Path, *extra: str) -> int:
    from hooked_vit.cli import main

    return main(["impact", *ARGS, "--out", str(out), *extra])


def rows(out: Path) -> list[dict]:
    from analyses.common.results import read_csv

    return read_csv(out / "toy" / "wanda" / "toy.csv")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-reference")
    assert impact(out) == 0
    return out


def test_the_toy_level_runs_as_a_level_of_the_study(reference):
    table = rows(reference)
    assert [(r["model"], r["unit"]) for r in table] == [(m, u) for m in ("dense", "wanda 0.5") for u in UNITS]
    dense = [r["mean_logit"] for r in table if r["model"] == "dense"]
    sparse = [r["mean_logit"] for r in table if r["model"] == "wanda 0.5"]
    assert dense != sparse  # two different models were loaded
    report = (reference / "report.md").read_text()
    assert "## Toy (no table)" in report and "Unit of work: one class of one model." in report
    assert "| Toy | `n_images` | `6` |" in report  # the level's own open choices
    for unit in UNITS:
        assert (reference / "toy" / "wanda" / "sparsity_0.5" / f"{unit}.json").is_file()


def test_a_kill_between_units_resumes_without_touching_finished_units(reference, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    monkeypatch.setenv(KILL_AT, "sparsity_0.5/class_3")
    with pytest.raises(Killed):
        impact(out)
    level_dir = out / "toy" / "wanda"
    finished = sorted(level_dir.rglob("class_*.json"))
    assert {p.relative_to(level_dir).as_posix() for p in finished} == {
        "sparsity_0/class_0.json", "sparsity_0/class_3.json", "sparsity_0/class_7.json", "sparsity_0.5/class_0.json"}
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    assert not (level_dir / "done.json").exists()
    monkeypatch.delenv(KILL_AT)
    assert impact(out) == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # finished units were not recomputed
    assert rows(out) == rows(reference)
    assert '"resumed": true' in (level_dir / "done.json").read_text()


def test_the_result_combines_from_saved_records_without_loading_a_model(reference, tmp_path):
    import shutil

    from analyses.common.level import combine_units
    from analyses.impact.runner import stored_config

    copy = tmp_path / "copy"
    shutil.copytree(reference / "toy" / "wanda", copy)
    for name in ("result.json", "toy.csv", "done.json"):
        (copy / name).unlink()

    def no_model(config, variant):
        raise AssertionError("combining must not load a model")

    config = stored_config(reference).level_config("toy", "wanda")
    result = combine_units(Toy(model_loader=no_model), config, copy)
    assert result.rows == ToyResult.load(reference / "toy" / "wanda").rows == rows(reference)


def test_two_torchrun_processes_share_the_units(reference, cache, tmp_path):
    out = tmp_path / "two"
    script = tmp_path / "toy_study.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_level_interface  # registers the toy level
        from hooked_vit.cli import main
        sys.exit(main(["impact", *{ARGS!r}, "--out", {str(out)!r}]))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert rows(out) == rows(reference)
    from analyses.common.results import read_json

    pids = {read_json(p)["record"]["pid"] for p in (out / "toy" / "wanda").rglob("class_*.json")}
    assert len(pids) == 2  # each process computed its share
    assert '"processes": 2' in (out / "toy" / "wanda" / "done.json").read_text()


def test_the_config_fields_are_the_options(tmp_path, capsys):
    import argparse

    from analyses.common.options import add_config_options, given_options

    parser = argparse.ArgumentParser()
    add_config_options(parser, ToyConfig)
    text = parser.format_help()
    assert "--n-images N" in text and "images scored per unit (default: 6)" in text
    assert "--sparsities A,B,..." in text and "{wanda,magnitude,magnitude_row}" in text
    args = parser.parse_args(["--n-images", "3", "--sparsities", "0,0.3"])
    assert given_options(args, ToyConfig) == {"n_images": 3, "sparsities": (0.0, 0.3)}
    for bad in (["--n-images", "three"], ["--sparsities", "0,,1"], ["--method", "sparsegpt"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
