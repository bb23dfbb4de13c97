"""The package's shape: hooked_vit never imports analyses (the analyses' subcommands arrive as a
plugin), the earlier flat module paths still import as the same modules, each level has the one
shape the study runner uses, and shards split units without overlap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_hooked_vit_never_imports_or_names_analyses():
    offenders = []
    for path in (ROOT / "hooked_vit").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("analyses."):
                names = [node.value]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "analyses"]
    assert offenders == []


def test_analyses_subcommands_come_from_the_entry_point_plugin():
    from hooked_vit import cli

    cli.load_plugins()
    for name in ("impact", "neuron-metrics", "sae-train", "sae-eval", "circuits", "attribution"):
        assert cli.SUBCOMMANDS[name].run.startswith("analyses."), name
    code = ("import sys; from hooked_vit.cli import build_parser; build_parser(only='impact'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'timm'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"  # `hooked-vit impact --help` imports no heavy module


@pytest.mark.parametrize("old, new", [
    ("analyses.lrp", "analyses.model.lrp"), ("analyses.faithfulness", "analyses.model.faithfulness"),
    ("analyses.sae", "analyses.layer.sae"), ("analyses.neuron_level", "analyses.neuron.level"),
    ("analyses.layer_level", "analyses.layer.level"), ("analyses.model_level", "analyses.model.level"),
    ("analyses.results", "analyses.common.results"), ("analyses.models", "analyses.common.variants"),
])
def test_earlier_module_paths_are_the_same_modules(old, new):
    import importlib

    moved, home = importlib.import_module(old), importlib.import_module(new)
    assert moved is home and home.__spec__.name == new
    parent, _, leaf = old.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is home  # `from analyses import lrp` works too


def test_every_level_has_the_one_shape():
    import dataclasses
    import inspect

    from analyses.common.level import LEVELS
    from analyses.common.results import AnalysisResult
    from analyses.common.variants import FAMILY_FIELDS, ModelFamily

    assert list(LEVELS) == ["accuracy", "neuron", "layer", "circuit", "model"]
    for level in LEVELS.values():
        assert issubclass(level.config_class, ModelFamily), level.name
        assert {f.name for f in dataclasses.fields(level.config_class)} >= set(FAMILY_FIELDS)
        assert issubclass(level.result_class, AnalysisResult) and hasattr(level.result_class, "markdown")
        run = __import__("analyses.common.level", fromlist=["_resolve"])._resolve(level.run)
        assert {"shard", "show_progress"} <= set(inspect.signature(run).parameters), level.name


def test_shards_split_units_without_overlap_or_loss():
    from analyses.common.units import Shard
    from hooked_vit.errors import InvalidArgumentError

    units = list(range(11))
    for world in (1, 2, 3, 8):
        for offset in (0, 1, 5):
            parts = [Shard(rank, world).take(units, offset) for rank in range(world)]
            assert sorted(u for part in parts for u in part) == units
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert Shard().whole and not Shard(1, 2).whole
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(InvalidArgumentError, match="rank"):
            Shard(rank, world)
