"""Activations of any HookedViT hook, streamed from a labelled-image dataset: the data source of
SAE training (sae-lens 6 takes any iterator of ``[batch, d_in]`` tensors) and of SAE evaluation.

One *activation* is the feature vector of one token at one hook: ``d_in`` = the hook's trailing
dimensions flattened (``d_model`` for the residual stream, ``head * d_head`` for ``attn.hook_z``).
Token choice (:data:`TOKEN_CHOICES`): ``"cls"`` (1 per image), ``"patch"`` (``n_patches``) or
``"all"`` (``n_ctx`` = CLS then patches). Only the blocks up to the deepest hook run
(``model(images, stop_at_layer=...)``).

:class:`ActivationStore` serves two kinds of pass over the dataset:

* ordered (:meth:`~ActivationStore.ordered_chunks`, :meth:`~ActivationStore.collect`): every
  activation once, image by image and token by token within an image, with its image position;
* training stream (``next(store)``, endless): pass after pass over the images, each in a seeded
  order, mixed in a shuffling buffer and cut into ``train_batch_size`` batches (a pass's last
  partial batch is dropped). A pass is one epoch, or, when an epoch holds fewer activations than
  a batch (e.g. CLS tokens of a small dataset), the fewest epochs that fill one.
  ``state_dict()``/``load_state_dict()`` resume it at the same batch.

Where activations come from, in order of preference: an on-disk cache (``cache_dir``: safetensors
shards of ``images_per_shard`` images each plus ``meta.json``, built on first use, resumable,
keyed by the model's weights, the dataset, the hooks and the token choice), memory (when one
epoch's activations fit ``memory_limit_bytes``, they are computed once and reused every epoch),
or the model (recomputed every epoch). All three give the same activations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from hooked_vit import atomic
from hooked_vit.data import make_loader, progress
from hooked_vit.errors import CorruptFileError, InvalidArgumentError
from hooked_vit.reading import load_safetensors, read_json
from hooked_vit.tokens import (  # noqa: F401  (re-exported: the store's public vocabulary)
    TOKEN_CHOICES, HookLayout, check_tokens, hook_layout, select_tokens, token_positions)

CACHE_FORMAT = 1
META_FILE = "meta.json"
IMAGE_INDEX = "image_index"

Activations = dict[str, Tensor]


# ----------------------------------------------------------------------------- hooks and tokens
def n_tokens(model: nn.Module, tokens: str) -> int:
    """Activations per image for a token choice."""
    return token_positions(tokens, model.cfg.n_ctx, model.cfg.n_prefix_tokens).numel()


def default_hook_name(model: nn.Module) -> str:
    """The paper's site, the CLS token of the residual stream leaving the last block
    (``blocks.{n_layers-1}.hook_resid_post`` with ``tokens="cls"``); for a model without a class token
    (SigLIP's attention pool), the readout that stands for it: the pooled features ``hook_pooled``."""
    if not model.cfg.class_token:
        return "hook_pooled"
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def check_token_choice(model: nn.Module, layout: HookLayout, tokens: str) -> None:
    """One-line error for a token choice the hook cannot give: ``"patch"``/``"all"`` at a hook
    without a token axis, ``"cls"`` at a token hook of a model without a class token."""
    check_tokens(tokens)
    if not layout.has_positions and tokens != "cls":
        raise InvalidArgumentError(f"{layout.hook_name} is the CLS token only (no token axis): use tokens='cls'")
    if layout.has_positions and tokens == "cls" and not model.cfg.class_token:
        raise InvalidArgumentError(f"this model has no class token, so tokens='cls' at {layout.hook_name} has nothing "
                                   "to read: use the pooled readout hook_pooled (the default hook), or tokens 'patch' "
                                   "or 'all'")


@torch.no_grad()
def capture_activations(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    hook_names: Sequence[str],
    tokens: str = "cls",
) -> dict[str, Float[Tensor, "batch n_tok _d_in"]]:
    """Activations ``[batch, n_tok, d_in]`` of each hook for ``images``, in one forward pass that
    runs only the blocks up to the deepest hook. Values are those ``run_with_cache`` would give."""
    layouts = [hook_layout(model, name) for name in hook_names]
    stops = [layout.stop_at_layer for layout in layouts]
    stop = None if any(s is None for s in stops) else max(stops)
    n_ctx = model.cfg.n_ctx
    out: dict[str, Tensor] = {}

    def make_hook(layout: HookLayout):
        def capture(act: Tensor, hook: Any) -> None:
            out[layout.hook_name] = select_tokens(act.detach(), layout, tokens, n_ctx)

        return capture

    with model.hooks(fwd_hooks=[(layout.hook_name, make_hook(layout)) for layout in layouts]):
        model(images, stop_at_layer=stop)
    return out


# ----------------------------------------------------------------------------- config
@dataclass
class ActivationStoreConfig:
    """What an :class:`ActivationStore` serves and how (sizes in activations unless stated).

    ``hook_names``: one or more hooks captured in the same forward pass (batches then hold the same
    tokens at every hook). ``train_batch_size``: activations per training batch. ``buffer_size``:
    activations mixed in the shuffling buffer (half of it is emitted each refill). ``shuffle``:
    seeded image order and buffer mixing (``seed``); off, the stream is in dataset order.
    ``image_batch_size``: images per forward pass (default: 64 on CPU, 256 on GPU).
    ``memory_limit_bytes``: keep one epoch's activations in memory when they fit.
    ``cache_dir``: on-disk cache of safetensors shards (``images_per_shard`` images each).
    ``device``: where batches are delivered (default: the model's). ``dtype``: of the activations.
    """

    hook_names: tuple[str, ...]
    tokens: str = "cls"
    train_batch_size: int = 4096
    buffer_size: int = 2**16
    shuffle: bool = True
    seed: int = 0
    image_batch_size: int | None = None
    memory_limit_bytes: int = 2 * 2**30
    cache_dir: str | None = None
    images_per_shard: int = 1024
    device: str | None = None
    dtype: str = "float32"
    num_workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.hook_names, str):
            self.hook_names = (self.hook_names,)
        self.hook_names = tuple(self.hook_names)
        if not self.hook_names:
            raise InvalidArgumentError("an activation store needs at least one hook name")
        if len(set(self.hook_names)) != len(self.hook_names):
            raise InvalidArgumentError(f"hook names repeat: {list(self.hook_names)}")
        check_tokens(self.tokens)
        if self.cache_dir is not None and not str(self.cache_dir).strip():
            raise InvalidArgumentError("cache_dir must be a folder path, or None for no on-disk cache; got ''")
        for name in ("train_batch_size", "buffer_size", "images_per_shard"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shuffle and self.buffer_size < self.train_batch_size:
            raise InvalidArgumentError(f"buffer_size ({self.buffer_size}) must hold at least one batch "
                                       f"(train_batch_size {self.train_batch_size})")
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise InvalidArgumentError(f"dtype must be float32, float16, bfloat16 or float64, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _rows(acts: Activations) -> int:
    return next(iter(acts.values())).shape[0]


def _take(acts: Activations, index: Tensor | slice) -> Activations:
    return {name: value[index] for name, value in acts.items()}


def _cat(parts: Sequence[Activations]) -> Activations:
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


# ----------------------------------------------------------------------------- store
class ActivationStore:
    """Activations of ``cfg.hook_names`` at ``cfg.tokens`` over ``dataset`` (items
    ``(image [channel, height, width], label)``), computed with ``model`` (see the module docstring).

    ``next(store)`` gives a training batch ``[train_batch_size, d_in]`` (one hook; for several
    hooks :meth:`next_batch` gives a dict, and :meth:`multi_hook` an iterator of dicts as sae-lens'
    ``MultiSAETrainer`` takes).
    """

    def __init__(self, model: nn.Module, dataset: Dataset, cfg: ActivationStoreConfig):
        if len(dataset) == 0:
            raise InvalidArgumentError("cannot stream activations from an empty dataset")
        self.model = model
        self.dataset = dataset
        self.cfg = cfg
        self.layouts = {name: hook_layout(model, name) for name in cfg.hook_names}
        for layout in self.layouts.values():
            check_token_choice(model, layout, cfg.tokens)
        self.tokens_per_image = n_tokens(model, cfg.tokens)
        param = next(model.parameters())
        self.device = torch.device(cfg.device) if cfg.device is not None else param.device
        self.epoch = 0
        self.batches_in_epoch = 0
        self._stream: Iterator[Activations] | None = None
        self._memory: tuple[Activations, Tensor] | None = None
        self._cache_checked = False
        self._cache_usable = True  # False once the cache folder turned out unwritable

    # ------------------------------------------------------------------ sizes
    @property
    def hook_name(self) -> str:
        """The hook of a single-hook store."""
        if len(self.cfg.hook_names) != 1:
            raise InvalidArgumentError(f"this store captures {len(self.cfg.hook_names)} hooks; use next_batch() or multi_hook()")
        return self.cfg.hook_names[0]

    @property
    def d_in(self) -> int:
        """Width of a single-hook store's activations."""
        return self.layouts[self.hook_name].d_in

    @property
    def n_images(self) -> int:
        return len(self.dataset)

    @property
    def activations_per_epoch(self) -> int:
        return self.n_images * self.tokens_per_image

    @property
    def epochs_per_pass(self) -> int:
        """Epochs in one pass of the training stream: 1, or enough to fill one batch."""
        return max(1, math.ceil(self.cfg.train_batch_size / self.activations_per_epoch))

    @property
    def bytes_per_epoch(self) -> int:
        """Memory of one epoch's activations (all hooks), in bytes."""
        width = sum(layout.d_in for layout in self.layouts.values())
        return self.activations_per_epoch * width * self.cfg.torch_dtype.itemsize

    @property
    def source(self) -> str:
        """Where activations come from: ``"disk"``, ``"memory"`` or ``"model"``."""
        if self.cfg.cache_dir is not None and self._cache_usable:
            return "disk"
        return "memory" if self.bytes_per_epoch <= self.cfg.memory_limit_bytes else "model"

    def _ready_source(self) -> str:
        """:attr:`source`, after building (or checking) the disk cache when it is the source."""
        if self.source == "disk" and not self._cache_checked:
            self.build_cache()
        return self.source

    # ------------------------------------------------------------------ model passes
    def _loader(self, positions: Sequence[int] | None):
        dataset = self.dataset if positions is None else Subset(self.dataset, list(positions))
        return make_loader(dataset, batch_size=self.cfg.image_batch_size, device=self.device,
                           num_workers=self.cfg.num_workers)

    def _model_chunks(
        self, positions: Sequence[int] | None, desc: str, show: bool
    ) -> Iterator[tuple[Activations, Tensor]]:
        """Activations ``[n_rows, d_in]`` (rows: image-major, token-minor) and image positions of
        the images at ``positions`` (default all, in order), one forward batch at a time."""
        param = next(self.model.parameters())
        order = torch.arange(self.n_images) if positions is None else torch.as_tensor(list(positions))
        loader = self._loader(positions)
        start = 0
        for images, _ in progress(loader, desc=desc, total=len(loader), enabled=show and self.cfg.progress):
            images = images.to(device=param.device, dtype=param.dtype, non_blocking=True)
            acts = capture_activations(self.model, images, self.cfg.hook_names, self.cfg.tokens)
            batch = images.shape[0]
            flat = {name: value.reshape(-1, value.shape[-1]).to(self.device, self.cfg.torch_dtype)
                    for name, value in acts.items()}
            image_index = order[start:start + batch].repeat_interleave(self.tokens_per_image)
            start += batch
            yield flat, image_index

    # ------------------------------------------------------------------ disk cache
    def _identity(self) -> dict[str, Any]:
        from analyses.common.ablation import dataset_key, model_key

        return {"format": CACHE_FORMAT, "hook_names": list(self.cfg.hook_names), "tokens": self.cfg.tokens,
                "d_in": {name: layout.d_in for name, layout in self.layouts.items()},
                "tokens_per_image": self.tokens_per_image, "n_images": self.n_images,
                "images_per_shard": self.cfg.images_per_shard, "dtype": self.cfg.dtype,
                "model_key": model_key(self.model), "dataset_key": dataset_key(self.dataset)}

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_images / self.cfg.images_per_shard)

    def _shard_path(self, shard: int) -> Path:
        return Path(self.cfg.cache_dir) / f"shard_{shard:05d}.safetensors"

    def build_cache(self) -> Path:
        """Write the on-disk cache (``cfg.cache_dir``) if it is not complete: one shard per
        ``images_per_shard`` images, each written atomically and recorded in ``meta.json`` as it
        completes, so an interrupted build resumes at the next missing shard. A cache written for
        another model, dataset, hook set or token choice is refused; a corrupt ``meta.json`` is moved
        aside (with a warning) and the cache rebuilt. If the folder cannot be written (read-only,
        full disk), a warning says so and the store computes activations from the model instead."""
        if self.cfg.cache_dir is None:
            raise InvalidArgumentError("build_cache needs cfg.cache_dir")
        directory = Path(self.cfg.cache_dir)
        meta_path = directory / META_FILE
        identity = self._identity()
        done: set[int] = set()
        meta = self._read_meta(meta_path)
        if meta is not None:
            differing = sorted(k for k in identity if meta.get(k) != identity[k])
            if differing:
                raise InvalidArgumentError(f"activation cache {directory} was built for a different {', '.join(differing)}; "
                                           "delete it or choose another cache_dir")
            done = {s for s in meta.get("shards_done", []) if self._shard_path(s).is_file()}
        todo = [s for s in range(self.n_shards) if s not in done]
        try:
            directory.mkdir(parents=True, exist_ok=True)
            bar = progress(todo, desc=f"caching activations ({len(todo)} shards)", total=len(todo),
                           enabled=self.cfg.progress)
            for shard in bar:
                self._write_shard(shard)
                done.add(shard)
                self._write_meta(meta_path, identity, done)
            if not meta_path.is_file():
                self._write_meta(meta_path, identity, done)
        except OSError as error:
            warnings.warn(f"cannot write the activation cache {directory} ({error.strerror or error}); continuing "
                          "without it: activations are computed from the model", RuntimeWarning, stacklevel=2)
            self._cache_usable = False
        self._cache_checked = True
        return directory

    def _read_meta(self, path: Path) -> dict[str, Any] | None:
        """``meta.json``, or ``None`` if absent or corrupt (then moved aside, with a warning)."""
        if not path.is_file():
            return None
        try:
            return read_json(path, "an activation cache index (JSON)")
        except CorruptFileError as error:
            aside = atomic.move_aside(path, "corrupt")
            warnings.warn(f"{error}; moved it to {aside} and rebuilding the cache", RuntimeWarning, stacklevel=3)
            return None

    def _write_shard(self, shard: int) -> None:
        ips = self.cfg.images_per_shard
        positions = range(shard * ips, min((shard + 1) * ips, self.n_images))
        parts = list(self._model_chunks(positions, "", show=False))
        tensors = {name: value.cpu().contiguous() for name, value in _cat([p[0] for p in parts]).items()}
        tensors[IMAGE_INDEX] = torch.cat([p[1] for p in parts])
        atomic.save_safetensors(tensors, self._shard_path(shard))

    def _write_meta(self, path: Path, identity: dict[str, Any], done: set[int]) -> None:
        meta = {**identity, "n_shards": self.n_shards, "shards_done": sorted(done),
                "complete": len(done) == self.n_shards}
        atomic.write_json(path, meta)

    def _load_shard(self, shard: int) -> tuple[Activations, Tensor]:
        path = self._shard_path(shard)
        try:
            tensors = load_safetensors(path, "an activation cache shard (safetensors)")
        except CorruptFileError as error:  # e.g. a disk error since it was written: rebuild the shard
            aside = atomic.move_aside(path, "corrupt")
            warnings.warn(f"{error}; moved it to {aside} and recomputing the shard", RuntimeWarning, stacklevel=2)
            self._write_shard(shard)
            tensors = load_safetensors(path, "an activation cache shard (safetensors)")
        image_index = tensors.pop(IMAGE_INDEX)
        return {name: tensors[name].to(self.device, self.cfg.torch_dtype) for name in self.cfg.hook_names}, image_index

    # ------------------------------------------------------------------ ordered pass
    def ordered_chunks(self) -> Iterator[tuple[dict[str, Float[Tensor, "n_rows _d_in"]], Int[Tensor, "n_rows"]]]:
        """Every activation once, in dataset order (image-major, token-minor), in chunks: a dict
        hook -> ``[n_rows, d_in]`` and the dataset position of each row's image ``[n_rows]``."""
        source = self._ready_source()
        if source == "disk":
            for shard in range(self.n_shards):
                yield self._load_shard(shard)
        elif source == "memory":
            yield self._materialise()
        else:
            yield from self._model_chunks(None, f"activations {self._describe()}", show=True)

    def collect(self) -> tuple[dict[str, Float[Tensor, "n_rows _d_in"]], Int[Tensor, "n_rows"]]:
        """All activations (dict hook -> ``[n_images * n_tok, d_in]``, dataset order) and their
        image positions, in memory."""
        chunks = list(self.ordered_chunks())
        return _cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def _materialise(self) -> tuple[Activations, Tensor]:
        if self._memory is None:
            chunks = list(self._model_chunks(None, f"activations {self._describe()}", show=True))
            self._memory = (_cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
        return self._memory

    def _describe(self) -> str:
        hooks = self.cfg.hook_names[0] if len(self.cfg.hook_names) == 1 else f"{len(self.cfg.hook_names)} hooks"
        return f"{hooks} ({self.cfg.tokens})"

    # ------------------------------------------------------------------ training stream
    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)

    def _epoch_chunks(self, generator: torch.Generator) -> Iterator[Activations]:
        for _ in range(self.epochs_per_pass):
            yield from self._one_epoch(generator)

    def _one_epoch(self, generator: torch.Generator) -> Iterator[Activations]:
        source = self._ready_source()
        if source == "memory":
            yield self._materialise()[0]
        elif source == "disk":
            order = torch.randperm(self.n_shards, generator=generator) if self.cfg.shuffle else range(self.n_shards)
            for shard in order:
                yield self._load_shard(int(shard))[0]
        else:
            order = torch.randperm(self.n_images, generator=generator).tolist() if self.cfg.shuffle else None
            for acts, _ in self._model_chunks(order, "", show=False):
                yield acts

    def _epoch_batches(self, epoch: int) -> Iterator[Activations]:
        """Batches of pass ``epoch``: chunks mixed in the shuffling buffer, the last partial batch dropped."""
        generator = self._generator(epoch)
        size = self.cfg.train_batch_size
        buffer: Activations | None = None
        whole_epoch = self.source == "memory"
        for chunk in self._epoch_chunks(generator):
            buffer = chunk if buffer is None else _cat([buffer, chunk])
            rows = _rows(buffer)
            if whole_epoch or (self.cfg.shuffle and rows < self.cfg.buffer_size) or rows < size:
                continue
            if self.cfg.shuffle:
                buffer = _take(buffer, torch.randperm(rows, generator=generator).to(self.device))
                n_out = (rows // 2) // size * size or rows // size * size
            else:
                n_out = rows // size * size
            for start in range(0, n_out, size):
                yield _take(buffer, slice(start, start + size))
            buffer = _take(buffer, slice(n_out, None))
        if buffer is not None:
            rows = _rows(buffer)
            if self.cfg.shuffle:
                buffer = _take(buffer, torch.randperm(rows, generator=generator).to(self.device))
            for start in range(0, rows // size * size, size):
                yield _take(buffer, slice(start, start + size))

    def next_batch(self) -> dict[str, Float[Tensor, "batch _d_in"]]:
        """The next training batch: dict hook -> ``[train_batch_size, d_in]``."""
        for _ in range(2):
            if self._stream is None:
                self._stream = self._epoch_batches(self.epoch)
                for _ in range(self.batches_in_epoch):  # resuming inside an epoch
                    next(self._stream)
            try:
                batch = next(self._stream)
            except StopIteration:
                self.epoch += 1
                self.batches_in_epoch = 0
                self._stream = None
                continue
            self.batches_in_epoch += 1
            return batch
        raise AssertionError("unreachable")

    def __iter__(self) -> ActivationStore:
        return self

    def __next__(self) -> Float[Tensor, "batch d_in"]:
        """The next training batch ``[train_batch_size, d_in]`` of a single-hook store."""
        name = self.hook_name
        return self.next_batch()[name]

    def multi_hook(self) -> Iterator[dict[str, Float[Tensor, "batch _d_in"]]]:
        """Endless training batches as dicts hook -> ``[train_batch_size, d_in]``."""
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Position of the training stream (``epoch``: the pass, ``batches_in_epoch``: batches served
        in it) and the config it is for."""
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the training stream where :meth:`state_dict` was taken (same config, model
        and dataset give the same following batches)."""
        stream_fields = ("hook_names", "tokens", "train_batch_size", "buffer_size", "shuffle", "seed",
                         "images_per_shard")
        saved, mine = state.get("config", {}), asdict(self.cfg)

        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, (list, tuple)) else value

        differing = [k for k in stream_fields if k in saved and plain(saved[k]) != plain(mine[k])]
        if differing:
            raise InvalidArgumentError(f"store state was saved with a different {', '.join(sorted(differing))}")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self._stream = None
