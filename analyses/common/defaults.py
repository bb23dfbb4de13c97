"""Defaults every level shares (standard library only: the light CLI argument modules import them)."""

DEFAULT_MODEL = "deit3_tiny_digits"
DEFAULT_SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7)  # the paper's: dense + Wanda 0.1/0.3/0.5/0.7
