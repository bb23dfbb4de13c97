"""The model family every level runs over, as the first fields of its config (standard library
only: the command line builds its options from these fields without importing torch).

:func:`setting` declares a config field with its help text (and choices); the command line
(:mod:`analyses.common.options`) and the TOML study files use the field names as they are.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field
from typing import Any

from hooked_vit.cli_args import DEFAULT_ALIAS, PRUNING_METHODS
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.protocol import SAMPLINGS, variant_protocol

DEFAULT_MODEL = DEFAULT_ALIAS
DEFAULT_SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7)  # the paper's: dense + Wanda 0.1/0.3/0.5/0.7
# ModelFamily.classifier: the model's own head, a linear probe ("probe" or "probe:N"), or zero-shot class embeddings.
CLASSIFIER_MODEL, CLASSIFIER_PROBE, CLASSIFIER_ZERO_SHOT = "model", "probe", "zero-shot:"
CLASS_EMBEDDING_SUFFIXES = (".pt", ".pth", ".safetensors")


def setting(default: Any = MISSING, help: str = "", *, choices: tuple[Any, ...] | None = None,
            factory: Any = MISSING, metavar: str | None = None) -> Any:
    """A config field with the ``help`` (and ``choices``) its ``--option`` shows; ``factory`` for
    mutable defaults."""
    metadata = {"help": help, "choices": choices, "metavar": metavar}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def variant_settings(model: str, *, finetune_epochs: int | None = None, n_calib: int | None = None,
                     calib_sampling: str | None = None) -> dict[str, Any]:
    """``finetune_epochs``, ``n_calib`` and ``calib_sampling`` with every ``None`` replaced by the
    model preset's protocol (:func:`hooked_vit.protocol.variant_protocol`: the paper's 2 epochs
    everywhere, Wanda's 4,096 augmented draws for ImageNet models and 128 images for the embedded
    digits model)."""
    given = {"finetune_epochs": finetune_epochs, "n_calib": n_calib, "calib_sampling": calib_sampling}
    protocol = variant_protocol(model)
    return {key: protocol[key] if value is None else value for key, value in given.items()}


@dataclass
class ModelFamily:
    """The dense model and its pruned variants a level runs over (the fields every level config
    starts with). ``None`` variant settings are the model preset's protocol
    (:func:`variant_settings`), filled in on construction. ``classifier`` gives a headless model its
    class logits (:func:`analyses.common.variants.with_family_classifier`, docs/headless.md)."""

    model: str = setting(DEFAULT_MODEL, "model alias (e.g. deit3_base) or saved model folder")
    data: str = setting("builtin", "'builtin' (the model's own dataset) or an ImageNet-style folder root")
    sparsities: tuple[float | int, ...] = setting(DEFAULT_SPARSITIES, "fractions in [0, 1) of pruned weights; "
                                                  "0 is the dense model")
    method: str = setting("wanda", "pruning method", choices=PRUNING_METHODS)
    finetune_epochs: int | None = setting(None, "masked fine-tuning epochs of each variant (default: the model "
                                          "preset's, 2)")
    n_calib: int | None = setting(None, "Wanda calibration images from the train split (default: the preset's)")
    calib_sampling: str | None = setting(None, "how calibration images are drawn (default: the preset's)",
                                         choices=SAMPLINGS)
    classifier: str = setting(CLASSIFIER_MODEL, "where the class logits come from: 'model' (the model's own head), "
                              "'probe' (a linear probe on the pooled features of the train split of data, trained "
                              "once and cached; 'probe:N' on N images of it) or 'zero-shot:PATH' (CLIP class "
                              "embeddings [n_classes, d_embed] in a .pt or .safetensors file); a headless model "
                              "(DINOv2, SigLIP, a CLIP tower) needs one of the last two",
                              metavar="model|probe[:N]|zero-shot:PATH")
    device: str | None = setting(None, "torch device (default CUDA when available, else CPU)")

    def __post_init__(self) -> None:
        check_classifier(self.classifier)
        self.sparsities = tuple(self.sparsities)
        if self.method not in PRUNING_METHODS:
            raise InvalidArgumentError(f"method must be one of {', '.join(PRUNING_METHODS)}, got {self.method!r}")
        self.__dict__.update(variant_settings(self.model, finetune_epochs=self.finetune_epochs, n_calib=self.n_calib,
                                              calib_sampling=self.calib_sampling))
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise InvalidArgumentError(f"finetune_epochs must be a whole number >= 0, got {self.finetune_epochs!r}")
        check_positive(self, "n_calib", allow_none=False)
        if not self.sparsities:
            raise InvalidArgumentError("sparsities must hold at least one value in [0, 1) (0 is the dense model)")
        for s in self.sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
                raise InvalidArgumentError(f"sparsities must lie in [0, 1), got {s!r}")


def check_classifier(classifier: Any) -> None:
    """One-line error unless ``classifier`` is ``"model"``, ``"probe"``, ``"probe:N"`` (N >= 1) or
    ``"zero-shot:PATH"`` with a .pt, .pth or .safetensors PATH (whether it exists is checked on loading)."""
    text = classifier if isinstance(classifier, str) else ""
    count = text[len(CLASSIFIER_PROBE) + 1:] if text.startswith(CLASSIFIER_PROBE + ":") else None
    path = text[len(CLASSIFIER_ZERO_SHOT):] if text.startswith(CLASSIFIER_ZERO_SHOT) else None
    if text in (CLASSIFIER_MODEL, CLASSIFIER_PROBE) or (count is not None and count.isdigit() and int(count) >= 1):
        return
    if path and path.endswith(CLASS_EMBEDDING_SUFFIXES) and os.path.basename(path) not in CLASS_EMBEDDING_SUFFIXES:
        return
    raise InvalidArgumentError(f"classifier must be 'model', 'probe', 'probe:N' (N >= 1 images) or 'zero-shot:PATH' (a "
                               f"{', '.join(CLASS_EMBEDDING_SUFFIXES)} file of class embeddings), got {classifier!r}")


def check_positive(config: Any, *names: str, allow_none: bool = True) -> None:
    """One-line error unless each field ``names`` of ``config`` is a whole number >= 1 (or ``None``)."""
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a whole number >= 1{' (or None)' if allow_none else ''}, "
                                       f"got {value!r}")


def check_choice(config: Any, name: str, choices: tuple[Any, ...]) -> None:
    """One-line error unless field ``name`` of ``config`` is one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
