"""Circuit level of IMPACT (sec. 3.4 and 4.4, appendices A.1, A.4, C): learnable node masks at the
96 sites, mean replacement of the nodes left out, edge counts, NCQ, Tables 3 and 7.

>>> circuit = discover_circuit(model, train, class_id=3, config=CircuitConfig(k=1e-3, steps=600))
>>> circuit.nodes["blocks.2.mlp.hook_post"]     # bool [d_mlp]: the kept MLP neurons of block 2
>>> circuit.metrics["ncq"], circuit.metrics["acc_ablated"]
>>> with circuit.applied(model):                # every other node mean-replaced
...     logits = model(images)
>>> result = run_level(Circuit(), CircuitConfig(model="deit3_tiny_digits"), "runs/circuit")

Modules: ``config`` (settings, k presets), ``compute`` (the level: units, batches, combining),
``result`` (Tables 3/7), ``figures``, ``gates`` (Heaviside/sigmoid-surrogate masks), ``replacement``
(gating hooks), ``edges``, ``metrics``, ``discovery`` (training), ``circuit`` (one class's circuit as saved,
:class:`~analyses.circuit.circuit.ClassCircuit`).
The algorithm names below load lazily (they import torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from analyses.circuit.compute import Circuit
from analyses.circuit.config import CircuitConfig, resolve_k
from analyses.circuit.result import CircuitResult

_LAZY = {
    "discover_circuit": "discovery", "discover_circuits": "discovery", "dense_edge_count": "edges",
    "edge_counts": "edges", "edge_fractions": "edges", "NodeMasks": "gates", "heaviside_gate": "gates",
}
__all__ = sorted(["Circuit", "CircuitConfig", "CircuitResult", "resolve_k", *_LAZY])


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'analyses.circuit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"analyses.circuit.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
