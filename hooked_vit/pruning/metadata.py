"""What was done to a pruned model (method, sparsity, calibration, fine-tuning), kept on the model
as ``model.pruning_info`` and saved beside its weights as ``pruning.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hooked_vit import atomic
from hooked_vit.errors import CorruptFileError, InvalidArgumentError
from hooked_vit.reading import read_json

PRUNING_FILE = "pruning.json"
INFO_ATTR = "pruning_info"


@dataclass
class PruningInfo:
    """Pruning metadata and statistics.

    ``sparsity`` is the requested fraction of each row's weights set to zero; ``layer_sparsity`` and
    ``overall_sparsity`` are measured from the weights (fraction of exact zeros) of the pruned
    Linears. ``calibration`` identifies the calibration data (``None`` for magnitude pruning);
    ``finetune`` holds the fine-tuning settings once :func:`~hooked_vit.pruning.finetune` ran.
    """

    method: str
    sparsity: float
    nm: tuple[int, int] | None
    calibration: dict[str, Any] | None
    n_calibration_tokens: int | None
    layer_sparsity: dict[str, float]
    overall_sparsity: float
    seconds: float = 0.0
    finetune: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["nm"] = list(self.nm) if self.nm else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningInfo":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown pruning metadata fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        data["nm"] = tuple(data["nm"]) if data.get("nm") else None
        return cls(**data)

    def summary(self) -> str:
        """One line per block Linear plus the overall measured sparsity."""
        pattern = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:g} per row"
        lines = [f"{self.method} pruning, {pattern}: overall sparsity {self.overall_sparsity:.4f} "
                 f"({len(self.layer_sparsity)} Linears, {self.seconds:.1f} s)"]
        lines += [f"  {name:<24} {value:.4f}" for name, value in self.layer_sparsity.items()]
        return "\n".join(lines)


def get_info(model: Any) -> PruningInfo | None:
    """``model.pruning_info`` if the model was pruned, else ``None``."""
    return getattr(model, INFO_ATTR, None)


def write_info(info: PruningInfo, directory: str | Path) -> Path:
    """Write ``info`` to ``directory/pruning.json``."""
    return atomic.write_json(Path(directory) / PRUNING_FILE, info.to_dict())


def read_info(directory: str | Path) -> PruningInfo | None:
    """The :class:`PruningInfo` in ``directory/pruning.json``, or ``None`` if there is none."""
    path = Path(directory) / PRUNING_FILE
    if not path.is_file():
        return None
    fix = "delete it (the model loads unpruned-labelled) or save the model again"
    data = read_json(path, "pruning metadata (JSON)", fix)
    try:
        return PruningInfo.from_dict(data)
    except (TypeError, ValueError, KeyError) as error:
        raise CorruptFileError(path, "pruning metadata", fix, found=str(error)) from None
