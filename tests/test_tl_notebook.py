"""The TransformerLens tour notebook (demos/transformer_lens_tour.ipynb) is saved executed and runs
headless: its code cells are executed in order in one namespace (no Jupyter needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

NOTEBOOK = Path(__file__).resolve().parents[1] / "demos" / "transformer_lens_tour.ipynb"


def test_notebook_is_saved_with_outputs():
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    images = [o for c in cells for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # DLA by layer and head, patching, attention on the grid, SAE latents


def test_notebook_runs_headless(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    code = [("".join(c["source"])) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {"__name__": "__notebook__"}
    grad_enabled, threads = torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of batch-1 forward passes: one thread is fastest
    try:
        for index, source in enumerate(code):
            try:
                exec(compile(source, f"{NOTEBOOK.name} cell {index + 1}", "exec"), namespace)
            except Exception as error:  # name the failing cell
                pytest.fail(f"cell {index + 1} of {NOTEBOOK.name} failed: {error!r}")
    finally:
        if "sae_dir" in namespace:
            sae_saved = (Path(namespace["sae_dir"].name) / "cfg.json").is_file()
            namespace["sae_dir"].cleanup()
        torch.set_grad_enabled(grad_enabled)
        torch.set_num_threads(threads)
        plt.close("all")
    model = namespace["model"]
    assert namespace["resid"].shape == (model.cfg.n_layers, model.cfg.n_ctx)
    assert namespace["head_out"].shape == (model.cfg.n_layers, model.cfg.n_heads)
    # Patching the whole stream into the last block restores the clean run (metric 1) at CLS.
    assert abs(float(namespace["resid"][-1, 0]) - 1.0) < 0.2
    assert namespace["latents"].shape == (model.cfg.n_ctx, namespace["sae"].cfg.d_sae)
    assert sae_saved  # in sae-lens's format, loaded back with SAE.load_from_disk
