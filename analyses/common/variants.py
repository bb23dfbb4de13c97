"""The dense model and its pruned variants, as every IMPACT analysis loads and files them."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from analyses.common.family import (
    CLASSIFIER_MODEL,
    CLASSIFIER_PROBE,
    CLASSIFIER_ZERO_SHOT,
    ModelFamily,
    check_classifier,
    variant_settings,
)
from hooked_vit.data import resolve_device
from hooked_vit.errors import InvalidArgumentError


def headless_reason(model: nn.Module) -> str | None:
    """Why ``model``'s output is not class logits (``None`` if it is): no head (``n_classes=0``,
    the pooled features), or an alias preset without a dataset whose head is CLIP's projection."""
    from hooked_vit.pretrained import registry

    cfg = model.cfg
    if cfg.n_classes == 0:
        return "n_classes=0: its output is the pooled features"
    spec = registry().get(cfg.model_name)
    if cfg.dataset is None and spec is not None and spec.dataset is None:
        return f"its head is an embedding projection: the {cfg.n_classes} outputs are an image embedding, not classes"
    return None


def with_family_classifier(dense: nn.Module, classifier: str, data: str | os.PathLike = "builtin", *,
                           name: str | None = None, needs_logits: bool = True) -> nn.Module:
    """``dense`` with the classifier ``classifier`` names (:class:`ModelFamily`'s field) attached as
    its head (:func:`hooked_vit.classifier.attach_classifier`): ``"model"`` keeps its own head (a
    one-line error if it has none and ``needs_logits``), ``"probe"``/``"probe:N"`` trains (or reads
    the saved) linear probe on all / N images of ``data``'s train split, ``"zero-shot:PATH"`` folds
    the class embeddings in PATH with its projection. ``name``: the model as the user gave it (for
    the error)."""
    from hooked_vit.classifier import (
        attach_classifier,
        linear_probe,
        load_class_embeddings,
        zero_shot_head,
    )
    from hooked_vit.data import load_dataset

    check_classifier(classifier)
    if classifier == CLASSIFIER_MODEL:
        reason = headless_reason(dense)
        if reason is not None and needs_logits:
            raise InvalidArgumentError(
                f"{name or dense.cfg.model_name} is headless ({reason}) and the analysis needs class logits: pass "
                "--classifier probe (a linear probe on the train split of --data) or --classifier zero-shot:PATH "
                "(CLIP class embeddings [n_classes, d_embed], .pt or .safetensors)")
        return dense
    if classifier.startswith(CLASSIFIER_ZERO_SHOT):
        class_embeddings = load_class_embeddings(classifier[len(CLASSIFIER_ZERO_SHOT):])
        return attach_classifier(dense, zero_shot_head(dense, class_embeddings))
    n_images = int(classifier.split(":")[1]) if classifier != CLASSIFIER_PROBE else None
    probe = linear_probe(dense, load_dataset(data, split="train", model=dense), n_images=n_images)
    return attach_classifier(dense, probe)


def load_variant(model: str, sparsity: float, *, method: str = "wanda", finetune_epochs: int | None = None,
                 data: str | os.PathLike = "builtin", n_calib: int | None = None, calib_sampling: str | None = None,
                 calib_seed: int = 0, device: str | None = None, classifier: str = CLASSIFIER_MODEL,
                 needs_logits: bool = True) -> nn.Module:
    """``model`` at ``sparsity`` (dense at 0), pruned with ``method`` on calibration images from the
    train split of ``data`` (the dataset the analysis reads: ``"builtin"`` or an ImageNet-style
    root), then fine-tuned with the masks for ``finetune_epochs`` on that same train split; ``None``
    settings come from the model's preset (:func:`variant_settings`); ``finetune_epochs=0`` skips
    fine-tuning. The ``classifier`` (:func:`with_family_classifier`) is attached to the dense model
    first, so its variants are pruned and fine-tuned with it; a headless model keeps no head with
    ``classifier="model"`` when the analysis does not read logits (``needs_logits=False``) and no
    fine-tuning (which trains on labels) makes its variant. Variants are cached on disk
    (:func:`hooked_vit.pruning.recipe.pruned_model`); the model lands on ``device`` (default CUDA
    when available)."""
    from hooked_vit import HookedViT
    from hooked_vit.data import load_dataset
    from hooked_vit.pruning.recipe import pruned_model

    check_classifier(classifier)
    settings = variant_settings(model, finetune_epochs=finetune_epochs, n_calib=n_calib, calib_sampling=calib_sampling)
    epochs = settings["finetune_epochs"] if float(sparsity) else 0
    dense = HookedViT.from_pretrained(model, device=resolve_device(device))
    dense = with_family_classifier(dense, classifier, data, name=str(model), needs_logits=needs_logits or bool(epochs))
    if not float(sparsity):
        return dense
    train = load_dataset(data, split="train", model=dense) if epochs else None  # fine-tuning's data
    return pruned_model(dense, sparsity=float(sparsity), method=method, calibration=data,
                        n_calib=settings["n_calib"], calib_seed=calib_seed, calib_sampling=settings["calib_sampling"],
                        finetune={"epochs": epochs, "data": train} if epochs else None)


def sparsity_dir(out: str | os.PathLike, sparsity: float) -> Path:
    """``<out>/sparsity_<s>``: where an analysis files one model's results."""
    return Path(out) / f"sparsity_{float(sparsity):g}"


def load_model(config: ModelFamily, sparsity: float, *, needs_logits: bool = True) -> nn.Module:
    """``config.model`` at ``sparsity`` (dense at 0), pruned and fine-tuned from ``config.data``'s
    train split by the family's settings (:func:`load_variant`, cached on disk), on ``config.device``,
    with ``config.classifier``'s head (none needed for a headless model when not ``needs_logits``)."""
    return load_variant(config.model, sparsity, method=config.method, finetune_epochs=config.finetune_epochs,
                        data=config.data, n_calib=config.n_calib, calib_sampling=config.calib_sampling,
                        device=config.device, classifier=config.classifier, needs_logits=needs_logits)
