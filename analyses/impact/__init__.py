"""The whole IMPACT study in one call (``hooked-vit impact``): build or load the dense model and its
pruned variants, run the accuracy, neuron, layer, circuit and model levels on each, write
``report.md`` and ``report.html``. Resumable unit by unit; spreads over ``torchrun`` processes::

    from analyses import impact
    report = impact.run(impact.StudyConfig(model="deit3_tiny_digits"), out="runs/impact")
"""

from analyses.impact.config import PRESETS, StudyConfig, load_config, preset
from analyses.impact.runner import run

__all__ = ["PRESETS", "StudyConfig", "load_config", "preset", "run"]
