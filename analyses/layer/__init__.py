"""Layer level (IMPACT sec. 3.3 / 4.3, Table 2, Figure 3; Tables 5/6): BatchTopK SAEs through sae-lens
on each model, their quality and latent metrics. Config, the level's computation, its result."""

from analyses.layer.compute import Layer
from analyses.layer.config import LayerConfig
from analyses.layer.result import LayerResult

__all__ = ["Layer", "LayerConfig", "LayerResult"]
