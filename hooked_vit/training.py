"""Training of the embedded models (:data:`EMBEDDED_MODELS`): small timm ``VisionTransformer`` models
trained from scratch on the builtin digits train split by one recipe. ``deit3_tiny_digits`` (the
default: DeiT-III, LayerScale, class token), ``vit_tiny_digits_reg`` (class token + 4 registers,
LayerScale) and ``siglip_tiny_digits`` (SigLIP's layout: no class token, attention-pool head) share
size, data and recipe; only their timm keyword arguments differ.

Recipe (:class:`TrainConfig`): AdamW (timm's parameter groups: no weight decay on biases, norms,
LayerScale, position embedding, class and register tokens), linear warm-up then cosine decay to 0 per
step, label smoothing, and random affine augmentation (rotation, scale, shift) applied per batch on the
model-ready tensors. Everything random is seeded by ``seed``: the same seed on the same machine and
thread count gives the same weights. ``hooked-vit train-default --seed 0 --out pretrained_configs``
regenerates the shipped default files (3-5 minutes on 2 idle CPU cores).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from jaxtyping import Float
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

from hooked_vit import atomic
from hooked_vit.data.dataset import LabelledImages
from hooked_vit.data.digits import DIGITS_PREPROCESSING, load_digits_dataset
from hooked_vit.data.loaders import make_loader, resolve_device
from hooked_vit.data.sampling import balanced_positions
from hooked_vit.data.progress import progress
from hooked_vit.evaluation import evaluate

DEFAULT_ALIAS = "deit3_tiny_digits"
DEFAULT_SEED = 0
# The size all embedded models share: 4 blocks, width 96, 4 heads, 8x8 patches of 4x4 px on 32x32 images.
_SIZE: dict[str, Any] = {"img_size": 32, "patch_size": 4, "in_chans": 3, "num_classes": 10, "embed_dim": 96,
                         "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "qkv_bias": True}
_SIZE_TEXT = "4 blocks, width 96, 4 heads, MLP 384, patch 4 on 32x32 RGB"
_DATA_TEXT = "trained from scratch on the builtin scikit-learn digits (8x8 greyscale upscaled to 32x32, replicated to RGB)"


@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model's timm ``VisionTransformer`` keyword arguments and its one-line description."""

    timm_kwargs: dict[str, Any]
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_ALIAS: EmbeddedModel(
        {**_SIZE, "init_values": 1e-6, "no_embed_class": True, "class_token": True, "global_pool": "token"},
        "Embedded default model: a small DeiT-III (timm VisionTransformer with LayerScale, no_embed_class, "
        f"class token; {_SIZE_TEXT}) {_DATA_TEXT}."),
    "vit_tiny_digits_reg": EmbeddedModel(
        {**_SIZE, "init_values": 1e-6, "no_embed_class": True, "class_token": True, "reg_tokens": 4,
         "global_pool": "token"},
        "Embedded model with registers: a small ViT as DINOv2 with registers lays it out (timm VisionTransformer "
        f"with LayerScale, no_embed_class, class token + 4 register tokens, class-token readout; {_SIZE_TEXT}) "
        f"{_DATA_TEXT}."),
    "siglip_tiny_digits": EmbeddedModel(
        {**_SIZE, "init_values": 1e-6, "no_embed_class": True, "class_token": False, "global_pool": "map"},
        "Embedded model without a class token: a small ViT with timm's SigLIP readout (timm VisionTransformer with "
        "LayerScale as the other embedded models, no class token, attention-pool head AttentionPoolLatent reading "
        f"the final-norm patch tokens through one learned query; {_SIZE_TEXT}) {_DATA_TEXT}."),
}
# The variant protocol every embedded model's preset carries (read by hooked_vit.protocol): the
# paper's 2 epochs of masked fine-tuning, 128 class-balanced eval-transform calibration images.
EMBEDDED_PROTOCOL: dict[str, Any] = {
    "finetune_epochs": 2, "n_calib": 128, "calib_sampling": "quick",
    "note": "embedded model: the paper's 2 epochs of masked fine-tuning; 128 class-balanced eval-transform calibration "
            "images (the protocol measured on deit3_tiny_digits, see docs/protocol.md)"}
# The default model's arguments (kept under this name for its callers).
DEFAULT_TIMM_KWARGS: dict[str, Any] = EMBEDDED_MODELS[DEFAULT_ALIAS].timm_kwargs


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and augmentation settings (learning rates per step; shifts as a fraction of the
    image side; angles in degrees)."""

    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    max_rotation_deg: float = 10.0
    max_scale_change: float = 0.1
    max_shift: float = 3 / 32


# Shortened schedule used by the test suite: same model, no augmentation; on a 400-image slice
# (``train_default(n_train=400)``) it learns to ~60 % val accuracy in ~5 s on 2 cores.
SHORT_CONFIG = TrainConfig(epochs=10, batch_size=32, lr=3e-3, warmup_epochs=1.0, max_rotation_deg=0.0,
                           max_scale_change=0.0, max_shift=0.0)


@dataclass
class TrainResult:
    """A trained model (embedded model ``alias`` when trained by :func:`train_embedded`) with its
    per-epoch history (``epoch``, ``loss``, ``val_top1``), final validation metrics (see
    :func:`hooked_vit.evaluation.evaluate`) and wall time in seconds."""

    model: nn.Module
    config: TrainConfig
    seed: int
    alias: str = DEFAULT_ALIAS
    history: list[dict[str, float]] = field(default_factory=list)
    val: dict[str, float | int] = field(default_factory=dict)
    seconds: float = 0.0


def random_affine(
    images: Float[Tensor, "batch channel height width"],
    *,
    generator: torch.Generator,
    max_rotation_deg: float,
    max_scale_change: float,
    max_shift: float,
    fill: Float[Tensor, "channel"],
) -> Float[Tensor, "batch channel height width"]:
    """Rotate, scale and shift each image by its own uniform random amounts (bilinear); areas
    moved in from outside the image take the value ``fill`` (per channel)."""
    n = images.shape[0]

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(n) * math.radians(max_rotation_deg)
    inv_scale = 1.0 / (1.0 + uniform(n) * max_scale_change)
    shift = uniform(n, 2) * (2 * max_shift)  # affine_grid coordinates span [-1, 1]: 2 units per side
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    background = fill.to(images)[None, :, None, None]
    return F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + background


def black_level(model: nn.Module, channels: int) -> Float[Tensor, "channel"]:
    """The normalised value of a black pixel, ``-mean / std`` per channel, from the model's
    ``pretrained_cfg`` (zeros, the mean colour, when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        return torch.zeros(channels)
    return -torch.tensor(cfg["mean"], dtype=torch.float32) / torch.tensor(cfg["std"], dtype=torch.float32)


def build_embedded_model(alias: str = DEFAULT_ALIAS, seed: int = DEFAULT_SEED) -> VisionTransformer:
    """Embedded model ``alias``'s timm architecture with a fresh, ``seed``-ed initialisation and the
    digits preprocessing as its ``pretrained_cfg``."""
    spec = embedded_model(alias)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(**spec.timm_kwargs)
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **DIGITS_PREPROCESSING,
                            "architecture": alias}
    return model


def build_default_model(seed: int = DEFAULT_SEED) -> VisionTransformer:
    """:func:`build_embedded_model` of the default model ``deit3_tiny_digits``."""
    return build_embedded_model(DEFAULT_ALIAS, seed)


def embedded_model(alias: str) -> EmbeddedModel:
    """The :class:`EmbeddedModel` named ``alias`` (one of :data:`EMBEDDED_MODELS`)."""
    if alias not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {alias!r}; choose one of {', '.join(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[alias]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of ``step``: linear warm-up to 1 over ``warmup_steps``, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress_fraction = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_fraction)))


def train_classifier(
    model: nn.Module,
    train: LabelledImages,
    val: LabelledImages,
    config: TrainConfig = TrainConfig(),
    *,
    seed: int = DEFAULT_SEED,
    device: str | torch.device | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` (a timm classifier, in place) on ``train`` with ``config``; evaluate top-1 on
    ``val`` after every epoch. Shuffling and augmentation draw from generators seeded by ``seed``
    (the model's initialisation is the caller's)."""
    device = resolve_device(device)
    model.to(device)
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    loader = make_loader(train, batch_size=config.batch_size, shuffle=True, seed=seed, device=device)
    total_steps = config.epochs * len(loader)
    warmup_steps = max(1, round(config.warmup_epochs * len(loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps))
    augment_generator = torch.Generator().manual_seed(seed + 1)
    fill = black_level(model, channels=train[0][0].shape[0])
    result = TrainResult(model=model, config=config, seed=seed)
    start = time.perf_counter()
    epochs = progress(range(config.epochs), desc="train", total=config.epochs, enabled=show_progress and log is None)
    for epoch in epochs:
        model.train()
        loss_sum, n = 0.0, 0
        for images, labels in loader:
            images = random_affine(images, generator=augment_generator, max_rotation_deg=config.max_rotation_deg,
                                   max_scale_change=config.max_scale_change, max_shift=config.max_shift, fill=fill)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * labels.shape[0]
            n += labels.shape[0]
        metrics = evaluate(model, val, device=device, progress=False)
        result.history.append({"epoch": epoch + 1, "loss": loss_sum / n, "val_top1": metrics["top1"]})
        if log is not None:
            log(f"epoch {epoch + 1:3d}/{config.epochs}  train loss {loss_sum / n:.4f}  val top-1 {metrics['top1']:.4f}"
                f"  ({time.perf_counter() - start:.0f} s)")
    result.seconds = time.perf_counter() - start
    result.val = evaluate(model, val, device=device, progress=False)
    model.eval()
    return result


def train_embedded(
    alias: str = DEFAULT_ALIAS,
    *,
    seed: int = DEFAULT_SEED,
    epochs: int | None = None,
    config: TrainConfig | None = None,
    device: str | torch.device | None = "cpu",
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
) -> TrainResult:
    """Train embedded model ``alias`` from scratch on the digits train split (validated on the val
    split) with :class:`TrainConfig` (``epochs`` overrides its epoch count). CPU by default, as the
    shipped weights were made. ``n_train``/``n_val`` keep a class-balanced, ``seed``-ed slice of that
    many images of each split (quick checks and tests); ``None`` uses the whole split."""
    embedded_model(alias)
    config = config or TrainConfig()
    if epochs is not None:
        config = replace(config, epochs=epochs)
    if config.epochs < 1:
        raise ValueError(f"epochs must be a whole number >= 1; got {config.epochs}")
    model = build_embedded_model(alias, seed)
    train = _slice(load_digits_dataset("train", model=model), n_train, "n_train", seed)
    val = _slice(load_digits_dataset("val", model=model), n_val, "n_val", seed)
    result = train_classifier(model, train, val, config, seed=seed, device=device, show_progress=show_progress,
                              log=log)
    result.alias = alias
    return result


def train_default(**kwargs: Any) -> TrainResult:
    """:func:`train_embedded` of the default model ``deit3_tiny_digits`` (same keyword arguments)."""
    return train_embedded(DEFAULT_ALIAS, **kwargs)


def _slice(dataset: LabelledImages, n: int | None, what: str, seed: int) -> LabelledImages:
    """A class-balanced draw of ``n`` images of ``dataset`` (in dataset order); all of it for ``None``."""
    if n is None:
        return dataset
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(dataset):
        raise ValueError(f"{what} must be a whole number of images in [1, {len(dataset)}] or None; got {n!r}")
    positions = balanced_positions(dataset.labels, dataset.present_classes(), n, seed=seed)
    return dataset.subset(positions.sort().values)


def training_command(seed: int, epochs: int | None, out: str, *, n_train: int | None = None,
                     n_val: int | None = None, alias: str = DEFAULT_ALIAS) -> str:
    """The ``hooked-vit`` command line that reproduces a run (``--model`` only for a non-default model)."""
    options = {"--model": None if alias == DEFAULT_ALIAS else alias, "--seed": seed, "--epochs": epochs,
               "--n-train": n_train, "--n-val": n_val}
    return "hooked-vit train-default" + \
        "".join(f" {flag} {value}" for flag, value in options.items() if value is not None) + f" --out {out}"


def save_default(result: TrainResult, out_dir: str | os.PathLike, *, command: str) -> tuple[Path, Path]:
    """Write ``<alias>.safetensors`` (timm state-dict keys, fp32) and ``<alias>.json`` (the
    pretrained-config format read by :func:`hooked_vit.HookedViT.from_pretrained`, with the
    :data:`EMBEDDED_PROTOCOL`) to ``out_dir``, ``alias`` being the embedded model ``result`` trained."""
    spec = embedded_model(result.alias)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{result.alias}.safetensors"
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in result.model.state_dict().items()}
    atomic.save_safetensors(state, weights, metadata={"alias": result.alias, "seed": str(result.seed), "format": "timm"})
    config = {
        "alias": result.alias,
        "timm_name": None,
        "pretrained_tag": None,
        "weights_file": weights.name,
        "timm_kwargs": spec.timm_kwargs,
        "preprocessing": DIGITS_PREPROCESSING,
        "dataset": "digits",
        "num_classes": spec.timm_kwargs["num_classes"],
        "description": spec.description,
        "training": {
            "command": command,
            "seed": result.seed,
            "epochs": result.config.epochs,
            "val_top1": round(float(result.val["top1"]), 4),
            "val_top5": round(float(result.val["top5"]), 4),
            "n_val": int(result.val["n"]),
            "config": asdict(result.config),
            "environment": {"torch": torch.__version__, "timm": timm.__version__,
                            "threads": torch.get_num_threads(), "machine": platform.machine()},
        },
        "protocol": EMBEDDED_PROTOCOL,
    }
    config_path = out_dir / f"{result.alias}.json"
    atomic.write_json(config_path, config)
    return weights, config_path
