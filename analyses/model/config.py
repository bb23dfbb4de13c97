"""Settings of the model level (IMPACT sec. 3.5 / 4.5, Table 4, Figure 4), and the names its
options choose from (standard library only: :mod:`analyses.model.lrp` and
:mod:`analyses.model.faithfulness` take these names from here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analyses.common.family import ModelFamily, check_positive, setting
from hooked_vit.errors import InvalidArgumentError

# Attribution methods (keys of analyses.model.lrp.METHODS, in this order); the paper's is chefer.
ATTRIBUTION_METHODS: tuple[str, ...] = ("chefer", "attnlrp", "cp_lrp", "rollout", "gradxinput", "random")
DEFAULT_METHODS: tuple[str, ...] = ("chefer", "rollout", "random")
# How relevance crosses LayerScale (analyses.model.lrp): identity (conservative) or the paper's eq. 14.
LAYERSCALE_RULES: tuple[str, ...] = ("identity", "eq14")
# Chefer's row on an attention-pool model (analyses.model.lrp): the pool's own Chefer map or its pattern.
POOL_ROWS: tuple[str, ...] = ("chefer", "pattern")
# Reference images of insertion/deletion (analyses.model.faithfulness.reference_images).
REFERENCES: tuple[str, ...] = ("zero", "black", "blur", "mean")
KINDS: tuple[str, ...] = ("insertion", "deletion")  # the two faithfulness curves and their AUCs
PERTURBATION_BATCH = 256  # default perturbed images per forward: insertion/deletion is forward-bound


def _check_classes(config: Any, name: str) -> None:
    classes = getattr(config, name)
    if classes is None:
        return
    if not classes:
        raise InvalidArgumentError(f"{name} must name at least one class (or None for the default)")
    negative = [c for c in classes if isinstance(c, int) and c < 0]
    if negative:
        raise InvalidArgumentError(f"{name}: class indices must be >= 0, got {negative}")


@dataclass
class ModelConfig(ModelFamily):
    """Settings of a model-level run.

    The model family (``model`` pruned with ``method`` at each of ``sparsities``, see
    :class:`~analyses.common.family.ModelFamily`). Images: ``split`` of ``data``, the ``classes``
    given (default all), ``n_images`` of them drawn class-balanced with ``seed`` (default all, in
    dataset order). ``methods``: attribution methods (:data:`ATTRIBUTION_METHODS`). Chefer options:
    ``start_layer``, ``layerscale_rule``, ``cp_attention``, ``pool_row`` (:data:`POOL_ROWS`, attention-pool
    models only). Insertion/deletion: ``reference``
    (:data:`REFERENCES`) and ``step`` (pixels per step, default the image width). ``batch_size``:
    perturbed images per forward (default :data:`PERTURBATION_BATCH`). ``chunk_size`` images per
    saved unit; ``figure_classes``: classes of the Figure 4 rows (default the first four present).
    """

    split: str = setting("val", "split analysed")
    methods: tuple[str, ...] = setting(DEFAULT_METHODS, "attribution methods from "
                                            + ",".join(ATTRIBUTION_METHODS), choices=ATTRIBUTION_METHODS)
    classes: tuple[int | str, ...] | None = setting(None, "class indices, ids or names analysed (default all)")
    n_images: int | None = setting(None, "analyse this many images, drawn class-balanced with --seed (default all)")
    reference: str = setting("zero", "insertion/deletion reference image (zero: a zero model input)",
                             choices=REFERENCES)
    step: int | None = setting(None, "pixels per insertion/deletion step (default the image width)")
    start_layer: int = setting(0, "first block of the Chefer rollout")
    layerscale_rule: str = setting("identity", "LayerScale relevance rule (eq14 is the paper's, not conservative)",
                                   choices=LAYERSCALE_RULES)
    cp_attention: bool = setting(False, "Chefer: send the attention relevance only through V")
    pool_row: str = setting("chefer", "Chefer's row on an attention-pool model: the pool's Chefer map or its "
                                      "head-averaged pattern (no effect with a class token or mean pooling)",
                            choices=POOL_ROWS)
    figure_classes: tuple[int | str, ...] | None = setting(None, "classes of the Figure 4 rows (default the first "
                                                           "four present)")
    chunk_size: int = setting(50, "images per saved unit of work")
    seed: int = setting(0, "seed of the image sample and the random maps")
    batch_size: int | None = setting(None, f"perturbed images per forward (default {PERTURBATION_BATCH}, more on "
                                           "a large GPU)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in ATTRIBUTION_METHODS]
        if unknown or not self.methods:
            raise InvalidArgumentError(f"unknown attribution method(s) {unknown or list(self.methods)}; "
                                       f"choose from {', '.join(ATTRIBUTION_METHODS)}")
        if self.reference not in REFERENCES:
            raise InvalidArgumentError(f"unknown reference {self.reference!r}; choose one of {', '.join(REFERENCES)}")
        if self.layerscale_rule not in LAYERSCALE_RULES:
            raise InvalidArgumentError(f"unknown layerscale rule {self.layerscale_rule!r}; choose one of "
                                       f"{', '.join(LAYERSCALE_RULES)}")
        if self.pool_row not in POOL_ROWS:
            raise InvalidArgumentError(f"unknown pool row {self.pool_row!r}; choose one of {', '.join(POOL_ROWS)}")
        if self.n_images is not None and self.n_images < 1:
            raise InvalidArgumentError(f"n_images must be >= 1 (or None for all), got {self.n_images}")
        if self.chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.start_layer < 0:
            raise InvalidArgumentError(f"start_layer must be >= 0, got {self.start_layer}")
        if self.step is not None and self.step < 1:
            raise InvalidArgumentError(f"step must be >= 1 pixel, got {self.step}")
        check_positive(self, "n_images", "step", "batch_size")
        check_positive(self, "chunk_size", allow_none=False)
        _check_classes(self, "classes")
        _check_classes(self, "figure_classes")

    def method_options(self, method: str, first: int) -> dict[str, Any]:
        """Keyword options of ``method`` for the chunk starting at image ``first``."""
        if method == "chefer":
            return {"start_layer": self.start_layer, "layerscale_rule": self.layerscale_rule,
                    "cp_attention": self.cp_attention, "pool_row": self.pool_row}
        if method == "rollout":
            return {"start_layer": self.start_layer}
        if method == "random":
            return {"seed": self.seed + first}
        return {}

    def figure_method(self) -> str:
        """The method of the Figure 4 maps: the first non-random one."""
        return next((m for m in self.methods if m != "random"), self.methods[0])


# What the study's presets set (``[level.model]``) and what that reduces from the full protocol.
PRESETS: dict[str, dict] = {"quick": {"n_images": 100}, "paper": {"n_images": 5_000}}
REDUCED: dict[str, str] = {"quick": "100 class-balanced val images instead of all 360",
                           "paper": "5,000 class-balanced val images (5 per class) instead of all 50,000"}

CONFIG = ModelConfig

__all__ = ["ATTRIBUTION_METHODS", "CONFIG", "DEFAULT_METHODS", "KINDS", "LAYERSCALE_RULES", "PERTURBATION_BATCH",
           "POOL_ROWS", "REFERENCES", "ModelConfig"]
