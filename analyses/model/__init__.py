"""Model level (IMPACT sec. 3.5 / 4.5, Table 4, Figure 4): Chefer / AttnLRP attribution, insertion
and deletion; config, the level's computation, its result."""

from analyses.model.compute import Model
from analyses.model.config import ModelConfig
from analyses.model.result import ModelResult

__all__ = ["Model", "ModelConfig", "ModelResult"]
