"""How pruned variants are built by default (standard library only, so configs and the command
line can resolve it without importing torch): the calibration samplings, the paper's protocol, and
each model preset's own (the ``"protocol"`` entry of ``pretrained_configs/<alias>.json``)."""

from __future__ import annotations

from typing import Any

from hooked_vit.errors import InvalidArgumentError

REFERENCE_N_CALIB = 4096
SAMPLINGS: tuple[str, ...] = ("quick", "reference")
# The paper's protocol, for models whose preset does not say otherwise: 2 epochs of masked fine-tuning
# (Table 1), Wanda's ViT calibration (4,096 train images, with replacement, training augmentation).
PAPER_PROTOCOL = {"finetune_epochs": 2, "n_calib": REFERENCE_N_CALIB, "calib_sampling": "reference"}


def check_sampling(sampling: object) -> str:
    """``sampling`` if it is one of :data:`SAMPLINGS`, else a one-line error."""
    if sampling not in SAMPLINGS:
        raise InvalidArgumentError(f"calibration sampling must be one of {', '.join(SAMPLINGS)} ('quick': "
                                   "class-balanced without replacement, eval transform; 'reference': Wanda's, with "
                                   f"replacement and the training augmentation); got {sampling!r}")
    return str(sampling)


def variant_protocol(model_name: str) -> dict[str, Any]:
    """How the pruned variants of ``model_name`` are built by default: ``finetune_epochs``,
    ``n_calib`` and ``calib_sampling`` from the ``"protocol"`` entry of its preset
    (``pretrained_configs/<alias>.json``), else :data:`PAPER_PROTOCOL`."""
    from hooked_vit.pretrained import registry

    spec = registry().get(str(model_name).removeprefix("alias:"))
    preset = spec.extra.get("protocol", {}) if spec is not None else {}
    protocol = {key: preset.get(key, value) for key, value in PAPER_PROTOCOL.items()}
    check_sampling(protocol["calib_sampling"])
    return protocol
