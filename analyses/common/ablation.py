"""Dataset-mean activations at the circuit sites, and hooks that mean- or zero-ablate any units.

Ablation replaces chosen units by a reference (appendix A.4, eq. 11 of the IMPACT paper)::

    a_tilde = m * a + (1 - m) * a_ref

with ``m`` a per-unit mask (1 keeps the unit, 0 ablates it; fractional values interpolate, and a
mask that requires grad makes the hook differentiable, as circuit discovery needs) shaped
``site.mask_shape`` so it broadcasts against ``[batch pos *unit_dims]``, and ``a_ref`` the
dataset mean (``[pos *unit_dims]`` per position, or ``[*unit_dims]`` pooled over positions), or 0.

Units live at :class:`~hooked_vit.sites.Site`\\ s: the 96 circuit sites of ``model.sites`` and, for
attention heads as a whole, :func:`attention_head_site` (the head's output ``attn.hook_z``
``[batch pos head d_head]``, one unit per head; ablating it ablates the head's contribution to the
attention output, since the output projection is linear). :func:`resolve_site` accepts either.

:class:`ActivationMeans` holds per-position means of many hooks from one streaming pass
(:func:`compute_means`), saved as safetensors and reloaded by :func:`load_or_compute_means`, keyed
by the model's weights and the dataset's images.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.data import Dataset

from hooked_vit import atomic
from hooked_vit.data import make_loader, progress
from hooked_vit.errors import CorruptFileError, InvalidArgumentError, InvalidTypeError, UnknownNameError
from hooked_vit.pruning.cached import cache_root, state_digest, take_lock
from hooked_vit.reading import load_safetensors
from analyses.common.vocabulary import ALL_SITE_NAMES, HEAD_SITE  # noqa: F401  (public here too)
from hooked_vit.sites import SITE_NAMES, Site

REFERENCES: tuple[str, ...] = ("mean", "zero")
HookFn = Callable[..., Tensor]
_HEAD_HOOK = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


# ----------------------------------------------------------------------------- sites
def attention_head_site(model: nn.Module, layer: int) -> Site:
    """Attention heads of block ``layer`` as units: the head outputs ``blocks.{layer}.attn.hook_z``
    (``[batch pos head d_head]``), one unit per head, activation = L2 norm over ``d_head``."""
    n_layers = model.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise UnknownNameError(f"Layer {layer} out of range for a model with {n_layers} blocks")
    layer %= n_layers
    return Site(layer, HEAD_SITE, f"blocks.{layer}.attn.hook_z", "head", model.cfg.n_heads)


def resolve_site(model: nn.Module, site: Site | str | tuple[int, str]) -> Site:
    """A :class:`Site` from a Site, a ``(layer, name)`` pair (``name`` one of the 8 circuit sites or
    ``"attn_head"``) or a hook name (a circuit-site hook or ``blocks.L.attn.hook_z``)."""
    if isinstance(site, Site):
        return site
    if isinstance(site, tuple):
        layer, name = site
        if name == HEAD_SITE:
            return attention_head_site(model, layer)
        if name not in SITE_NAMES:
            raise UnknownNameError(f"Unknown site {name!r}; sites are {list(ALL_SITE_NAMES)}")
        return model.sites[layer, name]
    if isinstance(site, str):
        match = _HEAD_HOOK.match(site)
        if match:
            return attention_head_site(model, int(match.group(1)))
        if site in model.sites:
            return model.sites.from_hook_name(site)
        raise UnknownNameError(f"{site!r} is neither a circuit-site hook (e.g. {model.sites[0, 'mlp_act'].hook_name!r}) "
                               "nor an attention-head output hook (blocks.L.attn.hook_z)")
    raise InvalidTypeError(f"a site is a Site, a (layer, name) pair or a hook name; got {type(site).__name__}")


def default_mean_hooks(model: nn.Module) -> list[str]:
    """The hooks :func:`compute_means` covers by default: the 96 circuit sites (8 per block) and
    each block's head outputs ``attn.hook_z``."""
    return [*model.sites.hook_names, *(attention_head_site(model, layer).hook_name
                                       for layer in range(model.cfg.n_layers))]


def _has_positions(hook_name: str) -> bool:
    """Whether dim 1 of the hook's activation is the token position."""
    return not (hook_name == "hook_pooled" or hook_name.endswith(("attn_scores", "pattern")))


# ----------------------------------------------------------------------------- means
@dataclass
class ActivationMeans:
    """Per-position dataset means of hooks: ``means[hook]`` is the activation averaged over
    ``n_images`` images, with the batch dimension dropped (``[pos *unit_dims]``, or
    ``[*unit_dims]`` for a hook without a position axis such as ``hook_pooled``).
    ``model_key``/``dataset_key`` identify what they were computed from."""

    means: dict[str, Tensor]
    n_images: int
    model_key: str
    dataset_key: str

    def mean(self, hook_name: str, *, pooled: bool = False) -> Float[Tensor, "*dims"]:
        """The mean of ``hook_name``: per position, or with ``pooled`` also averaged over the
        positions (the image-and-token mean, ``[*unit_dims]``)."""
        if hook_name not in self.means:
            raise UnknownNameError(f"no mean stored for {hook_name!r}; stored: {len(self.means)} hooks, "
                                   f"e.g. {list(self.means)[:3]}. Pass it in hooks= when computing the means")
        value = self.means[hook_name]
        return value.mean(dim=0) if pooled and _has_positions(hook_name) else value

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ActivationMeans:
        return ActivationMeans({k: v.to(device=device, dtype=dtype) for k, v in self.means.items()},
                               self.n_images, self.model_key, self.dataset_key)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (keys in its metadata)."""
        meta = {"n_images": str(self.n_images), "model_key": self.model_key, "dataset_key": self.dataset_key}
        return atomic.save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.means.items()}, path,
                                       metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> ActivationMeans:
        from safetensors import SafetensorError, safe_open

        what = "an ActivationMeans file (safetensors with n_images, model_key, dataset_key metadata)"
        fix = "delete it; load_or_compute_means recomputes it"
        means = load_safetensors(path, what, fix, device=str(device) if device is not None else "cpu")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except SafetensorError as error:
            raise CorruptFileError(path, what, fix, found=str(error)) from None
        if not {"n_images", "model_key", "dataset_key"} <= set(meta):
            raise CorruptFileError(path, what, fix, found=f"metadata {sorted(meta)}")
        return cls(means, int(meta["n_images"]), meta["model_key"], meta["dataset_key"])


def model_key(model: nn.Module) -> str:
    """``<model name>-<first 16 hex of the state-dict SHA-256>``: equal weights, equal key."""
    return f"{getattr(model.cfg, 'model_name', 'model')}-{state_digest(model)[:16]}"


def dataset_key(dataset: Dataset) -> str:
    """``<name>-<split>-<n>-<hash>``; the hash covers the dataset's item identities and labels
    (``store_indices``/``labels`` of a :class:`~hooked_vit.data.LabelledImages`)."""
    digest = hashlib.sha256()
    for attr in ("store_indices", "labels"):
        value = getattr(dataset, attr, None)
        if isinstance(value, Tensor):
            digest.update(value.cpu().numpy().tobytes())
    name = getattr(dataset, "name", type(dataset).__name__)
    split = getattr(dataset, "split", "all")
    return f"{name}-{split}-{len(dataset)}-{digest.hexdigest()[:12]}"


@torch.no_grad()
def compute_means(
    model: nn.Module,
    dataset: Dataset,
    *,
    hooks: Iterable[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> ActivationMeans:
    """Means of ``hooks`` (default :func:`default_mean_hooks`) over ``dataset``'s images in one
    streaming forward pass (per-batch sums accumulated in float64, nothing cached), per position
    and feature."""
    hooks = list(dict.fromkeys(default_mean_hooks(model) if hooks is None else hooks))
    if not hooks:
        raise InvalidArgumentError("compute_means needs at least one hook")
    if len(dataset) == 0:
        raise InvalidArgumentError("cannot compute means over an empty dataset")
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    sums: dict[str, Tensor] = {}

    def accumulate(act: Tensor, hook) -> None:
        total = act.detach().sum(dim=0).double()  # batch sums in the model's dtype, running sum in float64
        sums[hook.name] = total if hook.name not in sums else sums[hook.name] + total

    n = 0
    loader = make_loader(dataset, batch_size=batch_size, device=device)
    with model.hooks(fwd_hooks=[(name, accumulate) for name in hooks]):
        for images, _ in progress(loader, desc="mean activations", total=len(loader), enabled=show_progress):
            model(images.to(device=device, dtype=param.dtype, non_blocking=True))
            n += images.shape[0]
    missing = [name for name in hooks if name not in sums]
    if missing:
        raise InvalidArgumentError(f"hooks {missing[:4]} did not fire during the forward pass")
    means = {name: (sums[name] / n).to(param.dtype) for name in hooks}
    return ActivationMeans(means, n, model_key(model), dataset_key(dataset))


def means_path(model: nn.Module, dataset: Dataset, directory: str | os.PathLike | None = None) -> Path:
    """Where :func:`load_or_compute_means` keeps the means of ``model`` on ``dataset``
    (default directory: ``<hooked_vit cache>/means``)."""
    directory = Path(directory) if directory is not None else cache_root() / "means"
    return directory / f"{model_key(model)}__{dataset_key(dataset)}.safetensors"


def load_or_compute_means(
    model: nn.Module,
    dataset: Dataset,
    *,
    directory: str | os.PathLike | None = None,
    hooks: Iterable[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> ActivationMeans:
    """The means of ``hooks`` for ``model`` on ``dataset``: loaded from :func:`means_path` when a
    file there covers every hook, else computed (:func:`compute_means`) and saved there. Processes
    asking for the same file at once (torchrun ranks, parallel jobs) take turns on its lock, so one
    computes and the others load."""
    hooks = list(dict.fromkeys(default_mean_hooks(model) if hooks is None else hooks))
    path = means_path(model, dataset, directory)
    with means_lock(path):
        return _load_or_compute(model, dataset, path, hooks, batch_size, device, show_progress)


@contextlib.contextmanager
def means_lock(path: Path) -> Iterator[None]:
    """Hold the file lock ``.<means file>.lock`` beside ``path`` (waiting up to the cache lock
    timeout); where the folder cannot be written, go on without it."""
    try:
        lock = take_lock(path.parent / f".{path.name}.lock", "computing these means")
    except OSError:  # a read-only cache: nothing will be saved, so there is nothing to share
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _load_or_compute(model: nn.Module, dataset: Dataset, path: Path, hooks: list[str], batch_size: int | None,
                     device: str | torch.device | None, show_progress: bool) -> ActivationMeans:
    """:func:`load_or_compute_means`'s work, under the lock."""
    param = next(model.parameters())
    if path.is_file():
        try:
            stored = ActivationMeans.load(path, device=param.device)
        except CorruptFileError as error:
            aside = atomic.move_aside(path, "corrupt")
            warnings.warn(f"{error}; moved it to {aside} and recomputing the means", RuntimeWarning, stacklevel=3)
        else:
            if set(hooks) <= set(stored.means):
                return stored
            hooks = list(dict.fromkeys([*stored.means, *hooks]))
    means = compute_means(model, dataset, hooks=hooks, batch_size=batch_size, device=device,
                          show_progress=show_progress)
    try:
        means.save(path)
    except OSError as error:
        warnings.warn(f"could not cache the means at {path} ({error}); continuing without caching",
                      RuntimeWarning, stacklevel=3)
    return means


# ----------------------------------------------------------------------------- ablation
def unit_mask(
    site: Site,
    ablated: Sequence[int] | Int[Tensor, "k"],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "*mask_shape"]:
    """A hard mask of shape ``site.mask_shape``: 0 at the ``ablated`` unit indices, 1 elsewhere."""
    index = torch.as_tensor(ablated, dtype=torch.long).reshape(-1)
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < site.width):
        raise IndexError(f"unit indices must lie in [0, {site.width}) at site {site.name} of block {site.layer}; "
                         f"got [{int(index.min())}, {int(index.max())}]")
    mask = torch.ones(site.width, device=device, dtype=dtype)
    mask[index.to(mask.device)] = 0.0
    return mask.reshape(site.mask_shape)


def ablate(
    act: Float[Tensor, "batch *act_dims"],
    mask: Float[Tensor, "*mask_dims"],
    reference: Float[Tensor, "*ref_dims"],
) -> Float[Tensor, "batch *act_dims"]:
    """``mask * act + (1 - mask) * reference`` (eq. 11), ``mask`` and ``reference`` broadcast
    against ``act``; the result has ``act``'s shape, dtype and device."""
    mask = mask.to(device=act.device, dtype=act.dtype)
    reference = reference.to(device=act.device, dtype=act.dtype)
    return (mask * act + (1.0 - mask) * reference).expand_as(act)


def ablation_hook(mask: Float[Tensor, "*mask_dims"], reference: Float[Tensor, "*ref_dims"]) -> HookFn:
    """A TransformerLens forward hook applying :func:`ablate` with ``mask`` and ``reference``."""

    def hook(act: Tensor, hook=None) -> Tensor:
        return ablate(act, mask, reference)

    return hook


def site_reference(
    site: Site,
    reference: str | Tensor,
    means: ActivationMeans | None = None,
    *,
    pooled: bool = False,
) -> Float[Tensor, "*ref_dims"]:
    """The replacement values at ``site``: its dataset mean (``"mean"``, per position unless
    ``pooled``), ``"zero"`` (a scalar 0), or a given tensor broadcastable to the activation."""
    if isinstance(reference, Tensor):
        return reference
    if reference == "mean":
        if means is None:
            raise InvalidArgumentError("mean ablation needs means=: an ActivationMeans (see load_or_compute_means)")
        return means.mean(site.hook_name, pooled=pooled)
    if reference == "zero":
        return torch.zeros(())
    raise InvalidArgumentError(f"reference must be one of {REFERENCES} or a tensor, got {reference!r}")


def ablation_hooks(
    model: nn.Module,
    units: Mapping[Site | str | tuple[int, str], Sequence[int] | Tensor],
    *,
    reference: str = "mean",
    means: ActivationMeans | None = None,
    pooled: bool = False,
) -> list[tuple[str, HookFn]]:
    """Forward hooks that ablate, together, ``units[site]`` (unit indices) at each site, replacing
    them by their mean (``reference="mean"``, from ``means``) or by 0 (``"zero"``); every other
    unit and site is untouched. Use with ``model.run_with_hooks(images, fwd_hooks=...)``."""
    param = next(model.parameters())
    out = []
    for key, ablated in units.items():
        site = resolve_site(model, key)
        mask = unit_mask(site, ablated, device=param.device, dtype=param.dtype)
        ref = site_reference(site, reference, means, pooled=pooled).to(device=param.device, dtype=param.dtype)
        out.append((site.hook_name, ablation_hook(mask, ref)))
    return out


def mean_ablation_hooks(
    model: nn.Module,
    units: Mapping[Site | str | tuple[int, str], Sequence[int] | Tensor],
    means: ActivationMeans,
    *,
    pooled: bool = False,
) -> list[tuple[str, HookFn]]:
    """:func:`ablation_hooks` with ``reference="mean"``."""
    return ablation_hooks(model, units, reference="mean", means=means, pooled=pooled)


def zero_ablation_hooks(
    model: nn.Module, units: Mapping[Site | str | tuple[int, str], Sequence[int] | Tensor]
) -> list[tuple[str, HookFn]]:
    """:func:`ablation_hooks` with ``reference="zero"``."""
    return ablation_hooks(model, units, reference="zero")

