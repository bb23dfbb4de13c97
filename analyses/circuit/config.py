"""Settings of circuit discovery (IMPACT sec. 3.4, appendices A.1 and C) and the per-model
sparsity coefficient ``k`` (standard library only: ``hooked-vit circuit --help`` is built from it).

Every field is stored with every circuit and result. The paper's words for the choices it leaves
open are quoted in ``docs/protocol.md``; the names here are the options offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from analyses.common.family import DEFAULT_MODEL, DEFAULT_SPARSITIES, ModelFamily, setting  # noqa: F401
from hooked_vit.errors import InvalidArgumentError

LOSSES: tuple[str, ...] = ("bce_margin", "ce_true_label")
SCHEDULES: tuple[str, ...] = ("step", "linear")
REFERENCES: tuple[str, ...] = ("mean", "pooled_mean", "zero")
# k per model alias, (dense, sparse): appendix C.2 for DeiT-III B/16; measured for the embedded model
# (docs, "Circuit level"). A preset JSON may carry its own as "circuit_k": {"dense": .., "sparse": ..}.
K_PRESETS: dict[str, tuple[float, float]] = {
    "deit3_base": (8e-5, 4e-5),
    "deit3_tiny_digits": (1e-3, 1e-3),
}
DEFAULT_K = 1e-3
# Settings that do not change a circuit (a resumed run may differ in them; k is in the unit's name).
RUN_ONLY: tuple[str, ...] = ("sparsities", "classes", "sweep_k", "random_control", "class_batch",
                             "eval_batch_size", "device")


@dataclass
class CircuitConfig(ModelFamily):
    """Settings of node-mask circuit discovery.

    Model family: ``model`` (alias) pruned with ``method`` at each of ``sparsities`` (0 = dense),
    Wanda calibrated on ``n_calib`` train images of ``data`` drawn by ``calib_sampling``, then
    ``finetune_epochs`` of masked fine-tuning on that train split (``None``: the model preset's
    protocol, :func:`analyses.common.family.variant_settings`); images from ``data`` (``"builtin"``:
    the model's own), masks trained on ``train_split``, metrics on ``val_split`` (never seen by the optimiser).

    Objective (eq. 10): ``loss`` (``"bce_margin"``: binary cross-entropy on ``logit_c -
    logsumexp(other logits)``; ``"ce_true_label"``: cross-entropy of all logits against the true
    label) + ``k`` x (number of active nodes). ``k=None`` takes the model's preset
    (:func:`resolve_k`). Each step sees ``batch_size`` images of the class and ``batch_size`` of the
    other classes (uniformly drawn), seeded by ``seed`` and the class.

    Optimisation (A.1, C.2): ``steps`` of AdamW (``lr``, ``weight_decay``) on the mask logits only,
    schedule ``"step"`` (x ``gamma`` at 1/3 and 2/3 of the steps) or ``"linear"`` decay to 0;
    gate Heaviside forward, sigmoid surrogate of temperature ``tau`` backward; logits drawn from
    N(``init_mean``, ``init_std``) and clamped to [-``clamp``, ``clamp``] after every step.

    Replacement of inactive nodes (eq. 11): ``reference`` ``"mean"`` (per-position dataset mean
    over the train split of the analysed model, optionally over ``n_means_images`` of them),
    ``"pooled_mean"`` (also averaged over positions) or ``"zero"``. ``freeze_ln``: LayerNorm scales
    held at their clean values (a faithfulness check). Metrics on ``n_eval`` val images of the
    class and as many of the others (default: all of the class). A circuit is flagged
    ``collapsed`` when its accuracy is more than ``collapse_drop`` below the full model's or its
    complement keeps accuracy above ``collapse_ablated``.

    Run only (:data:`RUN_ONLY`): ``classes`` (indices, ids or names; default all), ``sweep_k``
    (Table 7), ``random_control`` (also run a random-weight model), ``class_batch`` (classes
    trained together; default all), ``eval_batch_size``, ``device``.
    """

    train_split: str = setting("train", "split the masks are trained on")
    val_split: str = setting("val", "split the metrics are measured on")
    classes: tuple[int | str, ...] | None = setting(None, "class indices, ids or names (default all)")
    k: float | None = setting(None, "sparsity coefficient k of eq. 10 (default: the model's preset; 1e-3 for the "
                              "embedded model, 8e-5 dense / 4e-5 sparse for deit3_base)")
    sweep_k: tuple[float, ...] | None = setting(None, "k values of the Table 7 sensitivity study")
    steps: int = setting(600, "optimisation steps per circuit")
    batch_size: int = setting(32, "images of the class per step, and as many of the other classes")
    lr: float = setting(1e-2, "AdamW learning rate of the mask logits")
    weight_decay: float = setting(0.01, "AdamW weight decay of the mask logits")
    schedule: str = setting("step", "learning-rate schedule (step: x gamma at 1/3 and 2/3; linear: decay to 0)",
                            choices=SCHEDULES)
    gamma: float = setting(0.2, "factor of the step schedule")
    tau: float = setting(1.0, "temperature of the sigmoid surrogate gradient")
    init_mean: float = setting(0.5, "mean of the initial mask logits")
    init_std: float = setting(0.01, "standard deviation of the initial mask logits")
    clamp: float = setting(1.0, "mask logits clamped to [-clamp, clamp] after every step")
    loss: str = setting("bce_margin", "task loss", choices=LOSSES)
    reference: str = setting("mean", "replacement of left-out nodes (mean: per position)", choices=REFERENCES)
    n_means_images: int | None = setting(None, "means over this many train images (default all)")
    freeze_ln: bool = setting(False, "hold LayerNorm scales at their clean values")
    n_eval: int | None = setting(None, "val images of the class per circuit (default all), and as many of the others")
    collapse_drop: float = setting(0.1, "a circuit this far below the full model's accuracy is flagged collapsed")
    collapse_ablated: float = setting(0.75, "a circuit whose complement keeps this accuracy is flagged collapsed")
    seed: int = setting(0, "seed of mask initialisation and batches")
    random_control: bool = setting(False, "also run a random-weight model (control)")
    class_batch: int | None = setting(None, "classes trained together in one batch (default all)")
    eval_batch_size: int | None = setting(None, "images per evaluation batch (default 256)")

    def __post_init__(self) -> None:
        super().__post_init__()

        def fail(name: str, why: str) -> None:
            raise InvalidArgumentError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                fail(name, "must be a finite number > 0")

        for name in ("steps", "batch_size", "finetune_epochs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
        positive("steps")
        positive("batch_size")
        positive("lr")
        positive("tau")
        positive("clamp")
        positive("n_eval", allow_none=True)
        positive("n_means_images", allow_none=True)
        positive("class_batch", allow_none=True)
        positive("eval_batch_size", allow_none=True)
        if self.finetune_epochs < 0:
            fail("finetune_epochs", "must be >= 0")
        if self.k is not None and not (math.isfinite(self.k) and self.k >= 0):
            fail("k", "must be a finite number >= 0 (or None for the model's preset)")
        if self.sweep_k is not None:
            if not self.sweep_k or any(not (math.isfinite(k) and k >= 0) for k in self.sweep_k):
                fail("sweep_k", "must be a non-empty list of finite numbers >= 0")
        if self.loss not in LOSSES:
            fail("loss", f"must be one of {list(LOSSES)}")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {list(SCHEDULES)}")
        if self.reference not in REFERENCES:
            fail("reference", f"must be one of {list(REFERENCES)}")
        if not 0.0 < self.gamma <= 1.0:
            fail("gamma", "must lie in (0, 1]")
        if not (self.init_std >= 0 and math.isfinite(self.init_mean)):
            fail("init_std", "must be >= 0 with a finite init_mean")
        if not 0.0 <= self.weight_decay:
            fail("weight_decay", "must be >= 0")
        if not 0.0 <= self.collapse_drop <= 1.0:
            fail("collapse_drop", "must lie in [0, 1]")
        if not 0.5 <= self.collapse_ablated <= 1.0:
            fail("collapse_ablated", "must lie in [0.5, 1] (0.5 is chance)")
        if self.classes is not None and not self.classes:
            fail("classes", "must name at least one class (or be None for all)")
        if self.classes is not None and any(isinstance(c, int) and c < 0 for c in self.classes):
            fail("classes", "class indices must be >= 0")

    def settings(self) -> dict[str, Any]:
        """What one circuit depends on (besides the model's weights, its class and ``k``)."""
        from analyses.common.results import settings_without

        return settings_without(self, (*RUN_ONLY, "k"))


def resolve_k(config: CircuitConfig, sparsity: float) -> float:
    """The ``k`` of a model variant: ``config.k`` if set, else the model preset's (``circuit_k``
    in its preset JSON, else :data:`K_PRESETS`) for dense (``sparsity == 0``) or sparse models,
    else :data:`DEFAULT_K`."""
    if config.k is not None:
        return float(config.k)
    dense, sparse = K_PRESETS.get(config.model, (DEFAULT_K, DEFAULT_K))
    try:
        from hooked_vit.pretrained import get_spec

        preset = get_spec(config.model).extra.get("circuit_k")
        if isinstance(preset, dict):
            dense, sparse = float(preset.get("dense", dense)), float(preset.get("sparse", sparse))
    except (ValueError, KeyError):  # not a registered alias (a saved directory): the table's entry or the default
        pass
    return dense if float(sparsity) == 0.0 else sparse


# What the study's presets set (``[level.circuit]``) and what that reduces from the full protocol.
PAPER_CLASSES = tuple(range(0, 1000, 10))  # the paper's 100 classes are not listed: every 10th ImageNet index
PRESETS: dict[str, dict] = {
    "quick": {"classes": [0, 3, 7], "steps": 100, "batch_size": 16, "lr": 6e-2},
    "paper": {"classes": list(PAPER_CLASSES), "n_means_images": 50_000},
}
REDUCED: dict[str, str] = {
    "quick": "3 classes (0, 3, 7), 100 steps of 16+16 images at lr 6e-2 instead of 600 steps of 32+32 at 1e-2",
    "paper": "100 classes: every 10th ImageNet index (the paper's 100 classes in 13 groups are not listed); "
             "means over 50,000 class-balanced train images",
}

CONFIG = CircuitConfig
