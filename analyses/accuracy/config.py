"""Settings of the accuracy level (IMPACT Table 1)."""

from __future__ import annotations

from dataclasses import dataclass

from analyses.common.family import ModelFamily, check_positive, setting


@dataclass
class AccuracyConfig(ModelFamily):
    """The model family, measured on ``split`` of its data, ``batch_size`` images per forward
    (default by device)."""

    split: str = setting("val", "split measured")
    batch_size: int | None = setting(None, "images per forward pass (default by device)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "batch_size")


CONFIG = AccuracyConfig
