"""The pruning pipeline behind ``HookedViT.from_pretrained(name, sparsity=..., ...)``: resolve the
arguments, look up the on-disk cache, else prune (and optionally fine-tune) and store the result."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from hooked_vit.data import BUILTIN_DATASETS, load_dataset, make_loader
from hooked_vit.errors import InvalidArgumentError, InvalidTypeError
from hooked_vit.pruning import cached
from hooked_vit.pruning.calibration import (
    DEFAULT_CALIB_SEED,
    resolve_calibration,
)
from hooked_vit.pruning.finetuning import finetune as run_finetune
from hooked_vit.pruning.pruner import prune, resolve_sparsity
from hooked_vit.pruning.validation import check_method
from hooked_vit.protocol import PAPER_PROTOCOL, variant_protocol  # noqa: F401  (public here too)

DEFAULT_FINETUNE_BATCH_SIZE = 64
FINETUNE_KEYS = ("epochs", "lr", "weight_decay", "optimizer", "momentum", "schedule", "warmup_steps",
                 "label_smoothing", "max_grad_norm", "seed", "batch_size", "data")


def finetune_settings(finetune: int | dict[str, Any] | None) -> dict[str, Any] | None:
    """Normalise ``from_pretrained``'s ``finetune=``: ``None``/``0`` (no fine-tuning), an int
    (epochs), or a dict of :func:`~hooked_vit.pruning.finetune` keyword arguments plus ``batch_size``
    (default 64) and ``data`` (training dataset or builtin dataset name; default: the model's
    builtin dataset, train split)."""
    if finetune is None or finetune is False:
        return None
    if isinstance(finetune, int) and not isinstance(finetune, bool):
        finetune = {"epochs": finetune}
    if not isinstance(finetune, dict):
        raise InvalidTypeError(f"finetune must be None, a number of epochs, or a dict of settings {FINETUNE_KEYS}; "
                               f"got {type(finetune).__name__}")
    unknown = sorted(set(finetune) - set(FINETUNE_KEYS))
    if unknown:
        raise InvalidArgumentError(f"unknown finetune settings {unknown}; known: {', '.join(FINETUNE_KEYS)}")
    settings = {"epochs": 2, "batch_size": DEFAULT_FINETUNE_BATCH_SIZE, **finetune}
    for name in ("epochs", "batch_size"):
        value, low = settings[name], 0 if name == "epochs" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(f"finetune {name} must be a whole number >= {low}; got {value!r}")
    return None if settings["epochs"] == 0 else settings


def check_request(*, sparsity: float | int | None, method: str, nm: Any, finetune: Any) -> None:
    """Raise on invalid pruning arguments of ``from_pretrained`` (before any weights are loaded)."""
    check_method(method)
    resolve_sparsity(sparsity, nm)
    finetune_settings(finetune)


def _training_data(model: nn.Module, data: Any) -> tuple[Any, dict[str, Any]]:
    if data is None or isinstance(data, str):
        name = data if data is not None else getattr(model.cfg, "dataset", None)
        if name not in BUILTIN_DATASETS:
            raise InvalidArgumentError(
                f"fine-tuning needs training data and {'dataset ' + repr(name) if name else 'this model'} is not "
                f"builtin ({', '.join(sorted(BUILTIN_DATASETS))}); pass finetune={{'epochs': 2, 'data': dataset}} with "
                "a dataset of (image, label) items, or fine-tune yourself with hooked_vit.pruning.finetune"
            )
        return load_dataset(name, split="train", model=model), {"name": name, "split": "train"}
    return data, {"name": getattr(data, "name", type(data).__name__), "split": getattr(data, "split", None),
                  "len": len(data)}


def pruned_model(
    model: nn.Module,
    *,
    sparsity: float | int | None,
    method: str = "wanda",
    nm: Any = None,
    calibration: Any = None,
    n_calib: int | None = None,
    calib_seed: int = DEFAULT_CALIB_SEED,
    calib_sampling: str | None = None,
    finetune: int | dict[str, Any] | None = None,
    cache: bool = True,
    progress: bool = True,
) -> nn.Module:
    """``model`` (dense HookedViT) pruned as asked, from the cache when an entry exists, else
    pruned in place (and fine-tuned) and stored. ``sparsity=0`` without ``nm`` returns ``model``.
    ``calib_sampling``: ``"quick"`` (default when ``n_calib`` is given) or ``"reference"`` (see
    :mod:`hooked_vit.pruning.calibration`); ``n_calib=None``: the model preset's calibration
    (:func:`variant_protocol`)."""
    method = check_method(method)
    sparsity, nm = resolve_sparsity(sparsity, nm)
    if sparsity == 0.0 and nm is None:
        return model
    settings = finetune_settings(finetune)
    if n_calib is None:  # the preset's calibration (its sampling unless one is given)
        protocol = variant_protocol(model.cfg.model_name)
        n_calib, calib_sampling = protocol["n_calib"], calib_sampling or protocol["calib_sampling"]
    calib_sampling = calib_sampling or "quick"
    calib = (resolve_calibration(model, calibration, n=n_calib, seed=calib_seed, sampling=calib_sampling)
             if method == "wanda" else None)
    train_data, data_identity = (None, None) if settings is None else _training_data(model, settings.get("data"))
    payload = {
        "model": cached.state_digest(model), "model_name": model.cfg.model_name,
        "dtype": str(next(model.parameters()).dtype), "method": method, "sparsity": sparsity,
        "nm": list(nm) if nm else None, "calibration": calib.identity if calib else None,
        "finetune": None if settings is None else {**settings, "data": data_identity},
    }
    key = cached.cache_key(payload)
    directory = cached.entry_dir(model.cfg.model_name, method, sparsity, nm, key)

    def build(caching: bool) -> nn.Module:
        prune(model, method, sparsity, calibration=calib, nm=nm)
        if settings is not None:
            kwargs = {k: v for k, v in settings.items() if k not in ("batch_size", "data")}
            loader = make_loader(train_data, batch_size=settings["batch_size"], shuffle=True,
                                 seed=kwargs.get("seed", 0), device=next(model.parameters()).device)
            checkpoint_dir = directory.with_name(directory.name + ".finetune") if caching else None
            run_finetune(model, loader, checkpoint_dir=checkpoint_dir, progress=progress, **kwargs)
            model.pruning_info.finetune[-1]["data"] = data_identity
            model.pruning_info.finetune[-1]["batch_size"] = settings["batch_size"]
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return model

    def load(path: Path) -> nn.Module:
        param = next(model.parameters())
        return type(model)._from_directory(path).to(device=param.device, dtype=param.dtype).eval()

    if not cache:
        return build(False)
    return cached.cached_or_built(directory, key, payload, build, load)
