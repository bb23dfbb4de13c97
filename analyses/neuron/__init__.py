"""Neuron level (IMPACT sec. 3.2 / 4.2, Figure 2): attribution patching, the four neuron metrics, the runner."""
