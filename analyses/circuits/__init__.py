"""Circuit level of IMPACT (sec. 3.4 and 4.4, appendices A.1, A.4, C): learnable node masks at the
96 sites, mean replacement of the nodes left out, edge counts, NCQ, Tables 3 and 7.

>>> circuit = discover_circuit(model, train, class_id=3, config=CircuitConfig(k=1e-3, steps=600))
>>> circuit.nodes["blocks.2.mlp.hook_post"]     # bool [d_mlp]: the kept MLP neurons of block 2
>>> circuit.metrics["ncq"], circuit.metrics["acc_ablated"]
>>> with circuit.applied(model):                # every other node mean-replaced
...     logits = model(images)
>>> result = run_circuits(CircuitConfig(model="deit3_tiny_digits"), out="runs/circuits")

Modules: ``config`` (settings, k presets), ``gates`` (Heaviside/sigmoid-surrogate masks),
``replacement`` (gating hooks), ``edges``, ``metrics``, ``discovery`` (training), ``circuit``
(the saved object), ``runner`` (Tables 3/7), ``figures``, ``cli``. The names below load lazily, so
``analyses.circuits.cli`` stays free of heavy imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Circuit": "circuit", "CircuitConfig": "config", "resolve_k": "config", "discover_circuit": "discovery",
    "discover_circuits": "discovery", "dense_edge_count": "edges", "edge_counts": "edges",
    "edge_fractions": "edges", "NodeMasks": "gates", "heaviside_gate": "gates", "CircuitResult": "runner",
    "run_circuits": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analyses.circuits' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"analyses.circuits.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
