"""Accuracy level (IMPACT Table 1): top-1 / top-5 of the dense model and every pruned variant."""
