"""The IMPACT analyses, one subpackage per level, each working only through a HookedViT's hooks::

    analyses/common/     what every level shares: variants (dense + pruned models), results
                         (JSON/CSV with their config), units (per-unit resume, sharding), ablation means
    analyses/accuracy/   Table 1: top-1/top-5 of every variant
    analyses/neuron/     Figure 2: attribution patching, neuron metrics, the neuron level
    analyses/layer/      Table 2, Figure 3: activation store, BatchTopK SAEs (sae-lens), the layer level
    analyses/circuits/   Table 3: learnable node masks at the 96 circuit sites
    analyses/model/      Table 4, Figure 4: LRP / Chefer attribution, insertion and deletion
    analyses/impact/     the whole study as one command (``hooked-vit impact``) and its report

Every level has the same shape (:class:`analyses.common.level.Level`): a config dataclass, a run
over the model variants that saves per-unit results as it goes, a result that loads from disk, and
table and figure writers.

The modules' earlier flat names (``analyses.lrp``, ``analyses.sae``, ``analyses.neuron_level``, ...)
still import: they are the same module objects as their new homes (:data:`MOVED`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# Earlier import path -> where the module lives now.
MOVED: dict[str, str] = {
    "analyses.results": "analyses.common.results",
    "analyses.models": "analyses.common.variants",
    "analyses.ablation": "analyses.common.ablation",
    "analyses.neuron_metrics": "analyses.neuron.metrics",
    "analyses.attribution_patching": "analyses.neuron.attribution_patching",
    "analyses.neuron_level": "analyses.neuron.level",
    "analyses.neuron_level_cli": "analyses.neuron.cli",
    "analyses.sae": "analyses.layer.sae",
    "analyses.sae_quality": "analyses.layer.sae_quality",
    "analyses.activation_store": "analyses.layer.activation_store",
    "analyses.layer_level": "analyses.layer.level",
    "analyses.layer_level_cli": "analyses.layer.cli",
    "analyses.lrp": "analyses.model.lrp",
    "analyses.faithfulness": "analyses.model.faithfulness",
    "analyses.model_level": "analyses.model.level",
    "analyses.model_level_cli": "analyses.model.cli",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an earlier name of :data:`MOVED` as the very module object at its new path."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system overwrites it next; exec_module restores it
        return module

    def exec_module(self, module):  # noqa: ANN001, ANN201
        """Nothing to run (the module was executed under its new name); the import system has just
        set its ``__spec__`` to the earlier name's, so give it back its own."""
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
