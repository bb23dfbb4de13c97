"""The package's shape: hooked_vit never imports analyses (the analyses' subcommands arrive as a
plugin), each level has the one shape the driver runs and imports no other level, only the driver
loops over units, no import circle, and shards split units without overlap."""

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
    for name in ("impact", "accuracy", "neuron", "layer", "circuit", "model", "replacement", "transcoders", "mis",
                 "neuron-metrics", "sae-train", "sae-eval", "circuits", "attribution"):
        run = cli.SUBCOMMANDS[name].run
        assert (run if isinstance(run, str) else run.func.__module__).startswith("analyses."), name
    code = ("import sys; from hooked_vit.cli import build_parser; [build_parser(only=c) for c in "
            "('impact', 'accuracy', 'neuron', 'layer', 'circuit', 'model', 'replacement', 'transcoders', 'mis')]; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'timm', 'sae_lens'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"  # `hooked-vit <level> --help` imports no heavy module


SHORT_NAMES = {"transcoders": ("clt",)}  # a level's classes may carry the method's usual short name
LEVEL_FOLDERS = tuple(sorted(p.parent.name for p in (ROOT / "analyses").glob("*/compute.py")))


def _imports(path: Path, *, module_level: bool = False) -> list[str]:
    """The modules ``path`` imports (with ``module_level``, only those imported when it is imported)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if module_level:
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_level_has_the_one_shape_and_imports_no_other_level():
    import dataclasses

    from analyses.common.family import ModelFamily
    from analyses.common.level import BUILTIN, Level, get_level
    from analyses.common.results import AnalysisResult

    assert sorted(BUILTIN) == list(LEVEL_FOLDERS)
    for name in LEVEL_FOLDERS:
        folder = ROOT / "analyses" / name
        assert {"config.py", "compute.py", "result.py", "__init__.py"} <= {p.name for p in folder.glob("*.py")}, name
        level = get_level(name)
        assert issubclass(level, Level) and level.name == name and level.title and level.paper and level.unit
        stems = {name, *SHORT_NAMES.get(name, ())}  # ReplacementConfig, MISConfig, CLTConfig
        assert issubclass(level.Config, ModelFamily) and level.Config.__name__.removesuffix("Config").lower() in stems
        assert issubclass(level.Result, AnalysisResult) and level.Result.__name__.removesuffix("Result").lower() in stems
        assert {f.name for f in dataclasses.fields(level.Config)} >= {f.name for f in dataclasses.fields(ModelFamily)}
        for field in dataclasses.fields(level.Config):  # every option has its help text
            assert field.metadata.get("help"), f"{name}: {field.name} has no help"
        others = {f"analyses.{other}" for other in LEVEL_FOLDERS if other != name}
        for path in folder.rglob("*.py"):
            bad = [m for m in _imports(path) if any(m == o or m.startswith(o + ".") for o in others)]
            assert bad == [], f"{path.relative_to(ROOT)} imports another level: {bad}"


def test_no_level_module_repeats_the_driver_loop():
    """Only the driver saves and reads units and takes shards (analyses/common/level.py)."""
    loops = []
    for path in (ROOT / "analyses").rglob("*.py"):
        if path.is_relative_to(ROOT / "analyses" / "common"):
            continue
        text = path.read_text()
        loops += [f"{path.relative_to(ROOT)}: {word}" for word in ("save_unit(", "load_unit(", "read_unit(", ".take(")
                  if word in text]
    assert loops == []


def test_no_import_circle_among_the_analyses_modules():
    """No module imports, when it is imported, one that imports it back (directly or through others)."""
    modules = {_module_name(p): p for p in (ROOT / "analyses").rglob("*.py") if "docs" not in p.parts}
    graph = {name: {m for m in _imports(path, module_level=True) if m in modules and m != name}
             for name, path in modules.items()}
    circles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in graph[node]:
            if nxt in stack:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name], done)
    assert circles == []


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
