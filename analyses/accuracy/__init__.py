"""Accuracy level (IMPACT Table 1): config, the level's computation, its result."""

from analyses.accuracy.compute import Accuracy
from analyses.accuracy.config import AccuracyConfig
from analyses.accuracy.result import AccuracyResult

__all__ = ["Accuracy", "AccuracyConfig", "AccuracyResult"]
