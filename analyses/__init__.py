"""The IMPACT analyses (neuron, layer, circuit and model level), each working only through a
HookedViT's hooks and its circuit-site registry.

Pattern: an analysis takes a HookedViT, a dataset source and a config dataclass, and returns a
result object that saves to JSON/CSV (with the config that made it) and draws its figure.
"""
