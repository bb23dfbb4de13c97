"""Neuron level (IMPACT sec. 3.2 / 4.2, Figure 2): attribution patching and the four neuron metrics of
the top units per class and block: config, the level's computation, its result."""

from analyses.neuron.compute import Neuron
from analyses.neuron.config import NeuronConfig
from analyses.neuron.result import NeuronResult

__all__ = ["Neuron", "NeuronConfig", "NeuronResult"]
