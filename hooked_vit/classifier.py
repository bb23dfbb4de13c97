"""A classifier for a headless model (issue 20, requirement 5): "a linear probe trained on a dataset's
pooled features (saved beside, reused), or CLIP zero-shot class embeddings given as a tensor".

Both are one linear map ``d_pooled -> n_classes`` on the features the head reads (``hook_pooled``;
``cfg.d_pooled`` is ``d_model``, twice that for pooling ``'token_avg'``),
attached as the model's ``head`` (an :class:`~hooked_vit.components.Unembed`) by
:func:`attach_classifier`, so ``model(images)`` returns logits and every analysis, ``W_U`` and
``to_timm()`` work unchanged::

    probe = linear_probe(model, load_dataset("digits", split="train", model=model))  # trained once, then read
    attach_classifier(model, probe)
    attach_classifier(clip, zero_shot_head(clip, text_embeddings))                  # [n_classes, d_embed]

* :func:`linear_probe`: multinomial logistic regression (L-BFGS, full batch) on standardised pooled
  features, its L2 weight chosen on a seeded stratified validation split, then refit on all images
  (CLIP's linear-probe protocol). Saved in ``<cache>/probes/`` under a key of the weights, the
  architecture, the images and the settings; the next call with the same key reads it.
* :func:`zero_shot_head`: the CLIP projection ``P`` (the model's ``head``; the identity for a tower
  whose pooled output is the embedding, e.g. SigLIP) folded with the normalised class embeddings
  ``T_n``: ``W = s T_n P``, ``b = s T_n b_P``. The image embedding's norm is not divided: the logits
  are CLIP's times ``|P x + b_P|`` > 0 per image (same ranking, accuracy and argmax; not the same
  softmax). :func:`zero_shot_cosine_head` gives CLIP's exact logits, as a separate module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_vit import atomic
from hooked_vit.components import Unembed
from hooked_vit.errors import (
    CorruptFileError,
    InvalidArgumentError,
    InvalidTypeError,
    check,
)

PROBE_VERSION = 1  # bump when the recipe changes: old files are then not reused
L2_GRID: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # strongest first
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_MAX_ITER = 1000
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's learned logit scale, exp(4.6052) = 100 for the released models
# Hook flags of the config that do not change what the model computes (left out of the probe's key).
_HOOK_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


# ---------------------------------------------------------------------------------------- probe
@dataclass
class LinearProbe:
    """A trained linear probe: ``logits = hook_pooled @ weight.T + bias``.

    ``l2``: the L2 weight used (chosen on the validation split unless given); ``train_accuracy``: of
    the final fit on every probe image; ``val_accuracy``: held-out, of the fit on the train part at
    that ``l2``; ``settings``: what it was trained with; ``path``: its file (``None`` uncached);
    ``reused``: read from that file rather than trained."""

    weight: Float[Tensor, "n_classes d_pooled"]
    bias: Float[Tensor, "n_classes"]
    l2: float
    train_accuracy: float
    val_accuracy: float
    settings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reused: bool = False

    def head(self) -> Unembed:
        """The probe as a head ``d_model -> n_classes``."""
        n_classes, d_model = self.weight.shape
        head = Unembed(d_model, n_classes, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(self.weight)
            head.bias.copy_(self.bias)
        return head


@torch.no_grad()
def pooled_features(
    model: nn.Module, dataset: Any, *, batch_size: int | None = None
) -> tuple[Float[Tensor, "n d_pooled"], Int[Tensor, "n"]]:
    """The features the head reads (``hook_pooled``, float32, on the model's device) and the labels
    of every item of ``dataset``, in batches (the model in eval mode, restored after)."""
    from hooked_vit.data import make_loader

    param = next(model.parameters())
    loader = make_loader(dataset, batch_size=batch_size, device=param.device)
    features, labels, found = [], [], []

    def keep(pooled: Tensor, hook: Any) -> None:
        found.append(pooled.float())

    was_training = model.training
    model.eval()
    try:
        for images, batch_labels in loader:
            model.run_with_hooks(images.to(device=param.device, dtype=param.dtype), return_type=None,
                                 fwd_hooks=[("hook_pooled", keep)])
            features.append(found.pop())
            labels.append(batch_labels.to(param.device))
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels).long()


def fit_logistic(
    features: Float[Tensor, "n d"], labels: Int[Tensor, "n"], n_classes: int, l2: float, *,
    max_iter: int = DEFAULT_MAX_ITER, init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Float[Tensor, "n_classes d"], Float[Tensor, "n_classes"]]:
    """Multinomial logistic regression: the minimiser of ``mean cross-entropy + l2 / 2 |W|^2`` (bias
    not penalised) by full-batch L-BFGS with a strong-Wolfe line search from zero (or ``init``), at
    most ``max_iter`` iterations. Deterministic for given inputs."""
    d = features.shape[1]
    weight = (init[0].clone() if init else features.new_zeros(n_classes, d)).requires_grad_()
    bias = (init[1].clone() if init else features.new_zeros(n_classes)).requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> float:
    return float(((features @ weight.T + bias).argmax(-1) == labels).float().mean())


def _train_probe(features: Tensor, labels: Tensor, n_classes: int, *, l2: float | None, val_fraction: float,
                 seed: int, max_iter: int) -> LinearProbe:
    """Standardise (mean and population std of all images; no labels used), sweep ``L2_GRID``
    (strongest first, warm-started) on a stratified train/val split unless ``l2`` is given, keep the
    best validation accuracy (ties: the stronger L2), refit on all images and fold the
    standardisation back into the weights."""
    from hooked_vit.data import stratified_split

    mean, std = features.mean(0), features.std(0, correction=0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))  # constant features
    x = (features - mean) / std
    train, val = (i.to(x.device) for i in stratified_split(labels.cpu(), val_fraction=val_fraction, seed=seed))
    best, fit = None, None
    for value in (L2_GRID if l2 is None else (l2,)):
        fit = fit_logistic(x[train], labels[train], n_classes, value, max_iter=max_iter, init=fit)
        accuracy = _accuracy(x[val], labels[val], *fit)
        if best is None or accuracy > best[1]:
            best = (value, accuracy, fit)
    chosen, val_accuracy, fit = best
    weight_std, bias_std = fit_logistic(x, labels, n_classes, chosen, max_iter=max_iter, init=fit)
    weight = weight_std / std
    bias = bias_std - weight @ mean
    return LinearProbe(weight.cpu(), bias.cpu(), float(chosen), _accuracy(x, labels, weight_std, bias_std),
                       val_accuracy)


def _dataset_identity(dataset: Any) -> dict[str, Any]:
    """Name, split, size and a SHA-256 of the items: the image tensor's values (images in memory) or
    the file paths (images on disk), and the labels."""
    digest = hashlib.sha256()
    store, indices = getattr(dataset, "store", None), getattr(dataset, "store_indices", None)
    if isinstance(getattr(store, "images", None), Tensor) and indices is not None:
        images = store.images[indices].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(str(list(images.shape)).encode())
        digest.update(images.numpy().tobytes())
    elif getattr(store, "paths", None) is not None and indices is not None:
        digest.update("\n".join(str(store.paths[i]) for i in indices.tolist()).encode())
    else:
        raise InvalidTypeError(f"linear_probe needs a hooked_vit LabelledImages dataset (images in memory or files), "
                               f"got {type(dataset).__name__}; wrap tensors with LabelledImages.from_tensors")
    digest.update(dataset.labels.cpu().numpy().tobytes())
    return {"name": dataset.name, "split": dataset.split, "n": len(dataset), "sha256": digest.hexdigest()}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))


def _read_probe(path: Path, key: str) -> LinearProbe | None:
    """The probe saved at ``path`` for ``key``; ``None`` if absent or for another key; a corrupt
    file is moved aside with a warning (and ``None``)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("key") != key:
                return None
            info = json.loads(meta["probe"])
            weight, bias = handle.get_tensor("weight"), handle.get_tensor("bias")
        return LinearProbe(weight, bias, float(info["l2"]), float(info["train_accuracy"]),
                           float(info["val_accuracy"]), info["settings"], path, reused=True)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        aside = atomic.move_aside(path, "corrupt")
        warnings.warn(f"{CorruptFileError(path, 'a linear probe (safetensors)', found=str(error))}; moved it to "
                      f"{aside} and training the probe again", RuntimeWarning, stacklevel=3)
        return None


def _write_probe(path: Path, key: str, probe: LinearProbe) -> None:
    info = {"l2": probe.l2, "train_accuracy": probe.train_accuracy, "val_accuracy": probe.val_accuracy,
            "settings": probe.settings}
    atomic.save_safetensors({"weight": probe.weight.contiguous(), "bias": probe.bias.contiguous()}, path,
                            metadata={"key": key, "probe": json.dumps(info, default=str)})


def linear_probe(
    model: nn.Module,
    dataset: Any,
    *,
    l2: float | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    n_images: int | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    batch_size: int | None = None,
    cache: bool = True,
    directory: str | os.PathLike | None = None,
) -> LinearProbe:
    """A linear probe of ``model``'s pooled features (``hook_pooled``) on ``dataset`` (a
    :class:`~hooked_vit.data.LabelledImages`, e.g. a train split), one class per class of its label
    space: multinomial logistic regression with L2 weight ``l2`` (``None``: the best of
    :data:`L2_GRID` on a stratified ``val_fraction`` split drawn with ``seed``), then refit on all
    images, on standardised features (see the module docstring). ``n_images``: a class-balanced draw
    of that many images (``seed``) instead of all. Features are computed once, in batches of
    ``batch_size``.

    With ``cache`` the probe is saved in ``directory`` (default ``<hooked_vit cache>/probes``) as
    ``<model>-<dataset>-<split>-<key>.safetensors``, the key hashing the model's weights and
    architecture, the images and these settings; the next call with the same key reads it
    (``reused=True``). Concurrent callers take a file lock: one trains, the others read."""
    from hooked_vit.pruning.cached import cache_key, cache_root, state_digest, take_lock

    cfg = getattr(model, "cfg", None)
    check(cfg is not None and hasattr(model, "run_with_hooks"),
          f"linear_probe needs a HookedViT, got {type(model).__name__}")
    check(not cfg.has_dist_token,
          "a distilled DeiT has two heads (class and distillation); probe a model with one head")
    check(l2 is None or (isinstance(l2, (int, float)) and l2 >= 0), f"l2 must be a number >= 0 (or None to choose "
          f"it on a validation split), got {l2!r}")
    check(isinstance(val_fraction, float) and 0.0 < val_fraction < 1.0,
          f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    check(isinstance(max_iter, int) and max_iter >= 1, f"max_iter must be a whole number >= 1, got {max_iter!r}")
    identity = _dataset_identity(dataset)
    if n_images is not None:
        check(isinstance(n_images, int) and 1 <= n_images, f"n_images must be a whole number >= 1, got {n_images!r}")
        if n_images < len(dataset):
            from hooked_vit.data import balanced_positions

            dataset = dataset.subset(balanced_positions(dataset.labels, dataset.present_classes(), n_images, seed=seed))
    present = dataset.class_counts()[dataset.class_counts() > 0]
    smallest = int(present.min()) if present.numel() else 0
    check(present.numel() >= 2 and smallest >= 2, f"a linear probe needs at least 2 classes with at least 2 images "
          f"each (for its validation split); {dataset.name} {dataset.split} has {present.numel()} classes, the "
          f"smallest with {smallest} images")
    settings = {"features": "hook_pooled", "l2": l2, "l2_grid": list(L2_GRID) if l2 is None else None,
                "val_fraction": val_fraction, "seed": seed, "n_images": n_images, "max_iter": max_iter,
                "standardised": True, "refit": "train+val", "version": PROBE_VERSION}
    architecture = {k: v for k, v in cfg.to_dict().items() if k not in _HOOK_FLAGS}
    payload = {"model": state_digest(model), "architecture": architecture,
               "dtype": str(next(model.parameters()).dtype), "dataset": identity, "settings": settings}
    key = cache_key(payload)
    folder = Path(directory) if directory is not None else cache_root() / "probes"
    stem = "-".join(_safe(part) for part in (cfg.model_name, identity["name"], identity["split"], key[:16]))
    path = folder / f"{stem}.safetensors"
    record = {**settings, "dataset": identity, "n_classes": dataset.num_classes}

    def train() -> LinearProbe:
        features, labels = pooled_features(model, dataset, batch_size=batch_size)
        probe = _train_probe(features, labels, dataset.num_classes, l2=l2, val_fraction=val_fraction, seed=seed,
                             max_iter=max_iter)
        probe.settings = {**record, "l2": probe.l2}
        return probe

    if not cache:
        return train()
    found = _read_probe(path, key)
    if found is not None:
        return found
    try:
        lock = take_lock(folder / "locks" / f"{path.stem}.lock", f"training the linear probe {path.name}")
    except OSError as error:
        warnings.warn(f"cannot write the probe cache {folder} ({error}); training without saving", RuntimeWarning,
                      stacklevel=2)
        return train()
    try:
        found = _read_probe(path, key)  # another process may have trained it meanwhile
        if found is not None:
            return found
        probe = train()
        try:
            _write_probe(path, key, probe)
            probe.path = path
        except OSError as error:
            warnings.warn(f"could not save the linear probe to {path} ({error}); continuing without it",
                          RuntimeWarning, stacklevel=2)
        return probe
    finally:
        lock.release()


# ------------------------------------------------------------------------------------ zero-shot
def _projection(model: nn.Module, class_embeddings: Any,
                logit_scale: float) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The projection's weight ``[d_embed, d_model]`` and bias (the identity for an ``nn.Identity``
    head) and the class embeddings, checked, normalised and scaled ``[n_classes, d_embed]``."""
    cfg = getattr(model, "cfg", None)
    check(cfg is not None and hasattr(model, "head"), f"zero-shot heads need a HookedViT, got {type(model).__name__}")
    check(not cfg.has_dist_token, "a distilled DeiT has two heads (class and distillation); use a model with one head")
    if (not isinstance(class_embeddings, Tensor) or class_embeddings.ndim != 2
            or not class_embeddings.is_floating_point()):
        found = (f"a {class_embeddings.ndim}-d {class_embeddings.dtype} tensor {list(class_embeddings.shape)}"
                 if isinstance(class_embeddings, Tensor) else type(class_embeddings).__name__)
        raise InvalidArgumentError(f"class_embeddings must be a float tensor [n_classes, d_embed] (one text embedding "
                                   f"per class), got {found}")
    check(isinstance(logit_scale, (int, float)) and 0 < logit_scale < float("inf"),
          f"logit_scale must be a positive number (CLIP's is 100), got {logit_scale!r}")
    head = model.head
    if isinstance(head, nn.Identity):
        weight, bias, width, what = None, None, cfg.d_pooled, "the pooled features (no projection head)"
    elif isinstance(head, nn.Linear):
        weight, bias, width, what = head.weight, head.bias, head.out_features, "its projection head's output"
    else:
        raise InvalidTypeError(f"the model's head is {type(head).__name__}; a zero-shot head folds an nn.Linear "
                               "projection (CLIP) or none (the pooled features are the embedding)")
    n_classes, d_embed = class_embeddings.shape
    check(d_embed == width, f"class_embeddings are {d_embed} wide but the model's image embedding ({what}) is {width} "
          f"wide: give text embeddings of the same CLIP model, shape [n_classes, {width}]")
    check(n_classes >= 1, "class_embeddings has no rows: give one embedding per class")
    norms = class_embeddings.norm(dim=-1)
    check(bool(torch.isfinite(class_embeddings).all()) and bool((norms > 0).all()),
          "class_embeddings must be finite with no all-zero row (each row is normalised)")
    reference = weight if weight is not None else next(model.parameters())
    classes = (logit_scale * class_embeddings / norms[:, None]).to(device=reference.device, dtype=reference.dtype)
    return weight, bias, classes


def zero_shot_head(
    model: nn.Module, class_embeddings: Float[Tensor, "n_classes d_embed"], logit_scale: float = DEFAULT_LOGIT_SCALE
) -> Unembed:
    """CLIP zero-shot classes folded with the model's projection into one head ``d_model ->
    n_classes``: ``W = s T_n P``, ``b = s T_n b_P`` (``T_n``: the rows of ``class_embeddings``
    normalised; ``P``, ``b_P``: the model's ``head``, or the identity and 0 for a headless tower).
    Its logits are CLIP's, ``s cos(P x + b_P, T)``, times the image embedding's norm ``|P x + b_P|``
    (positive per image: same argmax and ranking); :func:`zero_shot_cosine_head` divides it."""
    weight, bias, classes = _projection(model, class_embeddings, logit_scale)
    n_classes, d_pooled = classes.shape[0], model.cfg.d_pooled
    head = Unembed(d_pooled, n_classes, device=classes.device, dtype=classes.dtype)
    with torch.no_grad():
        head.weight.copy_(classes if weight is None else classes @ weight)
        head.bias.copy_(torch.zeros(n_classes, dtype=classes.dtype) if bias is None else classes @ bias)
    return head


class ZeroShotCosineHead(nn.Module):
    """CLIP's exact zero-shot logits from the pooled features: ``s * normalize(P x + b_P) @ T_n.T``
    ``[batch, n_classes]``. Not linear, so not attachable as a model's head (``W_U``, LRP and
    ``to_timm`` need one): apply it to ``cache["hook_pooled"]``."""

    def __init__(self, projection: nn.Module, classes: Float[Tensor, "n_classes d_embed"]):
        super().__init__()
        self.projection = projection
        self.register_buffer("classes", classes)

    def forward(self, pooled: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch n_classes"]:
        return F.normalize(self.projection(pooled), dim=-1) @ self.classes.T


def zero_shot_cosine_head(
    model: nn.Module, class_embeddings: Float[Tensor, "n_classes d_embed"], logit_scale: float = DEFAULT_LOGIT_SCALE
) -> ZeroShotCosineHead:
    """CLIP's exact zero-shot classifier (cosine similarity times ``logit_scale``) on the pooled
    features, holding a copy of the model's projection."""
    weight, bias, classes = _projection(model, class_embeddings, logit_scale)
    if weight is None:
        return ZeroShotCosineHead(nn.Identity(), classes)
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
    with torch.no_grad():
        projection.weight.copy_(weight)
        if bias is not None:
            projection.bias.copy_(bias)
    return ZeroShotCosineHead(projection, classes)


def load_class_embeddings(path: str | os.PathLike) -> Float[Tensor, "n_classes d_embed"]:
    """The class embeddings ``[n_classes, d_embed]`` saved at ``path``: a ``.safetensors`` file or a
    ``torch.save``-d ``.pt``/``.pth`` file holding one tensor (alone or as the only dict value)."""
    from hooked_vit.reading import load_safetensors, torch_load

    path = Path(path)
    what = "class embeddings [n_classes, d_embed] (one tensor)"
    if path.suffix == ".safetensors":
        data = load_safetensors(path, f"{what}, safetensors")
    elif path.suffix in (".pt", ".pth"):
        data = torch_load(path, f"{what}, a torch file", map_location="cpu")
    else:
        raise InvalidArgumentError(f"class embeddings must be a .pt, .pth or .safetensors file, got {str(path)!r}")
    if isinstance(data, dict):
        tensors = [v for v in data.values() if isinstance(v, Tensor)]
        if len(tensors) != 1 or len(data) != 1:
            raise CorruptFileError(path, what, "save only the [n_classes, d_embed] tensor",
                                   found=f"{len(data)} entries: {', '.join(map(str, list(data)[:4]))}")
        data = tensors[0]
    if not isinstance(data, Tensor) or data.ndim != 2 or not data.is_floating_point():
        found = (f"a {data.ndim}-d {data.dtype} tensor {list(data.shape)}" if isinstance(data, Tensor)
                 else type(data).__name__)
        raise CorruptFileError(path, what, "save a float tensor [n_classes, d_embed]", found=found)
    return data


# -------------------------------------------------------------------------------------- attach
def attach_classifier(model: nn.Module, classifier: nn.Module | LinearProbe) -> nn.Module:
    """``model`` (a HookedViT, changed in place and returned) with ``head`` replaced by an
    :class:`~hooked_vit.components.Unembed` holding ``classifier`` (a :class:`LinearProbe`, or an
    ``nn.Linear`` ``d_model -> n_classes`` such as :func:`zero_shot_head`'s), ``cfg.n_classes`` and
    timm's ``num_classes`` set to its classes: ``model(images)`` returns its logits, ``W_U`` is its
    weight and ``to_timm()`` gives a timm model with that ``head``."""
    cfg = getattr(model, "cfg", None)
    check(cfg is not None and hasattr(model, "head"),
          f"attach_classifier needs a HookedViT, got {type(model).__name__}")
    check(not cfg.has_dist_token, "a distilled DeiT has two heads (class and distillation); attach a classifier to a "
                                  "model with one head")
    if isinstance(classifier, LinearProbe):
        classifier = classifier.head()
    if isinstance(classifier, ZeroShotCosineHead):
        raise InvalidTypeError("the cosine zero-shot head is not linear, so it cannot be the model's head (W_U, LRP "
                               "and to_timm need one); attach zero_shot_head(...) (same argmax), or apply the "
                               "cosine head to cache['hook_pooled']")
    if not isinstance(classifier, nn.Linear) or classifier.bias is None:
        raise InvalidTypeError(f"classifier must be a LinearProbe or an nn.Linear with bias (d_model -> n_classes), "
                               f"got {type(classifier).__name__}")
    check(classifier.in_features == cfg.d_pooled, f"the classifier reads {classifier.in_features} features but the "
          f"model's pooled features (hook_pooled) are {cfg.d_pooled} wide")
    param = next(model.parameters())
    n_classes = classifier.out_features
    head = Unembed(cfg.d_pooled, n_classes, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        head.weight.copy_(classifier.weight)
        head.bias.copy_(classifier.bias)
    model.head = head.train(model.training)
    cfg.n_classes = n_classes
    if cfg.timm_kwargs:  # to_timm builds timm's head from it
        cfg.timm_kwargs["num_classes"] = n_classes
    return model


__all__ = ["DEFAULT_LOGIT_SCALE", "L2_GRID", "LinearProbe", "ZeroShotCosineHead", "attach_classifier", "fit_logistic",
           "linear_probe", "load_class_embeddings", "pooled_features", "zero_shot_cosine_head", "zero_shot_head"]
