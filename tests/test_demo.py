"""The cache-and-patch demo runs end to end on deit3_base (random weights, offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "demos" / "cache_and_patch.py"


def test_cache_and_patch_demo_runs(capsys):
    spec = importlib.util.spec_from_file_location("cache_and_patch", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    report = demo.main(["--layer", "11", "--head", "0"])
    assert report["max_abs_logit_change"] > 0  # head 0's values differ between the two images
    assert "Patched head 0 of blocks.11.attn.hook_v" in capsys.readouterr().out
