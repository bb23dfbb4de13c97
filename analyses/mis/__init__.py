"""MIS level: per-unit interpretability without humans (Zimmermann, Klindt & Brendel, NeurIPS 2024) on
the 2AFC tasks of Zimmermann, Klein & Brendel (NeurIPS 2023): tasks, scores, the level. The task and
score functions (which need torch) are imported on first use, so the light config module stays
light (``hooked-vit mis --help`` imports no torch)."""

from importlib import import_module
from typing import Any

from analyses.mis.compute import MIS
from analyses.mis.config import MISConfig
from analyses.mis.result import MISResult

_LAZY = {"MISScores": "score", "fit_temperature": "score", "machine_interpretability_score": "score",
         "Tasks": "tasks", "draw_tasks": "tasks", "make_tasks": "tasks", "CLTEncoder": "dictionaries",
         "clt_encoder": "dictionaries", "replacement_sae": "dictionaries"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"analyses.mis.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'analyses.mis' has no attribute {name!r}")


__all__ = [
    "MIS",
    "CLTEncoder",
    "MISConfig",
    "MISResult",
    "MISScores",
    "Tasks",
    "clt_encoder",
    "draw_tasks",
    "fit_temperature",
    "machine_interpretability_score",
    "make_tasks",
    "replacement_sae",
]
