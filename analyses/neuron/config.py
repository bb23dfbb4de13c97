"""Settings of the neuron level (IMPACT sec. 3.2 / 4.2, Figure 2). Light: standard library only, so
``hooked-vit neuron --help`` never imports torch."""

from __future__ import annotations

from dataclasses import dataclass

from analyses.common.family import ModelFamily, check_choice, check_positive, setting
from analyses.common.vocabulary import ALL_SITE_NAMES, HEAD_SITE, NEGATIVE_RULES
from hooked_vit.errors import InvalidArgumentError

NEURON_SITES: tuple[str, ...] = ("mlp_act", HEAD_SITE)  # MLP neurons and whole heads compete for the top-K
SELECTIONS: tuple[str, ...] = ("drop", "absolute")


@dataclass
class NeuronConfig(ModelFamily):
    """The model family; ``split`` holds the analysed images, ``means_split`` those the ablation means
    are taken over (``n_means_images``: a class-balanced sample of that many, drawn with ``seed``).
    Per class (``classes``: indices, ids or names, default every class present in ``split``) and
    block (``blocks``, default early/middle/late; negative indices count from the end), the
    ``top_k`` units among ``sites`` chosen by ``selection``; ``negatives``: the rule of
    :mod:`analyses.common.metrics` for negative activations; ``pooled_means``: ablate with the mean
    over images and positions instead of the per-position mean."""

    split: str = setting("val", "split analysed")
    means_split: str = setting("train", "split the ablation means are taken over")
    classes: tuple[int | str, ...] | None = setting(None, "class indices, ids or names (default: every class "
                                                    "present in the split)")
    blocks: tuple[int, ...] | None = setting(None, "blocks analysed (default: early, middle, late)")
    top_k: int = setting(50, "units per class and block")
    sites: tuple[str, ...] = setting(NEURON_SITES, "unit sites competing for the top-K", choices=ALL_SITE_NAMES)
    selection: str = setting("drop", "rank units by estimated logit drop or absolute change", choices=SELECTIONS)
    negatives: str = setting("clamp", "rule for negative activations in class variance / label entropy",
                             choices=NEGATIVE_RULES)
    pooled_means: bool = setting(False, "ablate with means pooled over positions")
    n_means_images: int | None = setting(None, "take the means over a class-balanced sample of this many images "
                                         "(default: all)")
    seed: int = setting(0, "seed of that sample")
    batch_size: int | None = setting(None, "images per batch (default 64 CPU / 256 GPU)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "top_k", allow_none=False)
        check_positive(self, "n_means_images", "batch_size")
        check_choice(self, "selection", SELECTIONS)
        check_choice(self, "negatives", NEGATIVE_RULES)
        unknown = [s for s in self.sites if s not in ALL_SITE_NAMES]
        if unknown or not self.sites:
            raise InvalidArgumentError(f"sites must be a non-empty subset of {list(ALL_SITE_NAMES)}, got {list(self.sites)}")
        negative = [c for c in self.classes or () if isinstance(c, int) and not isinstance(c, bool) and c < 0]
        if negative:
            raise InvalidArgumentError(f"class indices must be >= 0, got {negative}")
        if self.classes is not None and not self.classes:
            raise InvalidArgumentError("classes must name at least one class (or be None: every class)")
        if self.blocks is not None and not self.blocks:
            raise InvalidArgumentError("blocks must name at least one block (or be None: early, middle, late)")


# What the study's presets set (``[level.neuron]``) and what that reduces from the full protocol.
PRESETS: dict[str, dict] = {"paper": {"n_means_images": 50_000}}
REDUCED: dict[str, str] = {"paper": "means over 50,000 class-balanced train images instead of all 1.28M"}

CONFIG = NeuronConfig
