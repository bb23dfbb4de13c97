"""Masked fine-tuning: train a pruned HookedViT while its pruned weights stay exactly zero, with
a progress bar and resumable checkpoints.

After every backward pass the gradients of pruned weights are zeroed, and after every optimizer
step the masks are re-applied, so decoupled weight decay, momentum or Adam moments cannot move a
pruned weight. Runs are deterministic given ``seed``: at the start of each epoch the global torch
RNG (inside a forked RNG state, so the caller's is left untouched) and the ``DataLoader``'s own
generator, if it has one, are set to ``seed + epoch``; they fix the shuffle order. A run resumed
from its checkpoint therefore replays the same batches and ends at the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from hooked_vit import atomic
from hooked_vit.bars import bars_enabled
from hooked_vit.errors import InvalidArgumentError, InvalidTypeError
from hooked_vit.pruning.masks import apply_masks, mask_gradients, measured_sparsity
from hooked_vit.pruning.metadata import get_info
from hooked_vit.reading import torch_load

CHECKPOINT_FILE = "finetune_last.pt"
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class FinetuneResult:
    """What a :func:`finetune` call did: ``epoch_losses`` is the mean training cross-entropy (nats)
    of each epoch run or replayed from the checkpoint; ``resumed_from_step`` is the optimizer step
    the run resumed at (``None`` if it started fresh)."""

    settings: dict[str, Any]
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from_step: int | None = None
    seconds: float = 0.0


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        images = batch.get("images", batch.get("image"))
        labels = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        images = labels = None
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise InvalidTypeError("train_loader must yield (images, labels) pairs or dicts with 'images' and 'labels' "
                               f"tensors, got {type(batch).__name__}")
    return images, labels


def training_loss(
    model: nn.Module,
    images: Float[Tensor, "batch channel height width"],
    labels: Int[Tensor, " batch"],
    label_smoothing: float | int = 0.0,
) -> Float[Tensor, ""]:
    """Mean cross-entropy (nats) of ``model(images)`` against integer ``labels``."""
    return F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)


def _make_optimizer(model: nn.Module, name: str | Callable, lr: float | int, weight_decay: float | int,
                    momentum: float | int) -> torch.optim.Optimizer:
    if callable(name):
        return name(model.parameters())
    decay, no_decay = [], []
    for pname, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and pname.endswith(".weight") else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise InvalidArgumentError(f"optimizer must be one of {OPTIMIZERS} or a callable params -> Optimizer, got {name!r}")


def _lr_lambda(schedule: str, total_steps: int | None, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or not total_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _check_settings(saved: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise InvalidArgumentError(f"checkpoint {path} was written by a fine-tuning run with other settings ({details}); "
                                   "pass the same settings, another checkpoint_dir, or resume=False to start over")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic.torch_save(state, path)


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    epochs: int = 2,
    *,
    lr: float | int = 1e-4,
    weight_decay: float | int = 0.05,
    optimizer: str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = "adamw",
    momentum: float | int = 0.9,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    label_smoothing: float | int = 0.0,
    max_grad_norm: float | int | None = 1.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``train_loader`` (``(images, labels)`` batches) for
    ``epochs`` epochs; pruned weights (``weight_mask`` buffers) stay exactly zero.

    ``optimizer``: ``"adamw"`` (default) or ``"sgd"`` (with ``momentum``), weight decay on the
    >=2-D weights only, or a callable ``params -> Optimizer``. ``schedule``: ``"cosine"`` decay of
    ``lr`` to 0 over the run (needs ``len(train_loader)``) after ``warmup_steps`` linear warm-up
    steps, or ``"constant"``. Gradients are clipped to ``max_grad_norm`` (``None``: no clipping).

    With ``checkpoint_dir``, model, optimizer, schedule and progress are saved to
    ``checkpoint_dir/finetune_last.pt`` every ``checkpoint_every`` steps and after every epoch; with
    ``resume=True`` a run finding that file continues from it (a finished run just loads the final
    state). The model is left in eval mode; the settings are appended to
    ``model.pruning_info.finetune`` when the model was pruned.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise InvalidArgumentError(f"epochs must be a whole number >= 0; got {epochs!r}")
    if schedule not in SCHEDULES:
        raise InvalidArgumentError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise InvalidArgumentError(f"checkpoint_every must be a positive int (optimizer steps) or None, got {checkpoint_every!r}")
    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    if schedule == "cosine" and steps_per_epoch is None:
        raise InvalidArgumentError("schedule='cosine' needs len(train_loader); use schedule='constant' for an unsized loader")
    total_steps = steps_per_epoch * epochs if steps_per_epoch is not None else None
    settings = dict(
        epochs=epochs, lr=lr, weight_decay=weight_decay,
        optimizer=optimizer if isinstance(optimizer, str) else getattr(optimizer, "__qualname__", repr(optimizer)),
        momentum=momentum, schedule=schedule, warmup_steps=warmup_steps, label_smoothing=label_smoothing,
        max_grad_norm=max_grad_norm, seed=seed, steps_per_epoch=steps_per_epoch,
    )
    param = next(model.parameters())
    opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(schedule, total_steps, warmup_steps))
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    epoch, skip, global_step, epoch_losses, resumed_from = 0, 0, 0, [], None
    loss_sum, loss_count = 0.0, 0
    if path is not None and resume and path.is_file():
        state = torch_load(path, "a fine-tuning checkpoint", "delete it to restart fine-tuning, or pass resume=False",
                           map_location=param.device)
        _check_settings(state["settings"], settings, path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        epoch, skip, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        epoch_losses, loss_sum, loss_count = list(state["epoch_losses"]), state["loss_sum"], state["loss_count"]
        resumed_from = global_step

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        if path is not None:
            _save_checkpoint(path, dict(
                model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step, settings=settings,
                epoch_losses=epoch_losses, loss_sum=loss_sum, loss_count=loss_count,
            ))

    # A DataLoader's (or its sampler's) own generator fixes the shuffle order: reseed it per epoch too.
    generators = {id(g): g for g in (getattr(train_loader, "generator", None),
                                     getattr(getattr(train_loader, "sampler", None), "generator", None))
                  if isinstance(g, torch.Generator)}.values()
    start = time.perf_counter()
    apply_masks(model)
    model.train()
    bar = tqdm(total=total_steps, initial=global_step, desc="finetune", unit="step", disable=not bars_enabled(progress))
    try:
        with torch.random.fork_rng(devices=[]):
            while epoch < epochs:
                torch.manual_seed(seed + epoch)
                for generator in generators:
                    generator.manual_seed(seed + epoch)
                for step_in_epoch, batch in enumerate(train_loader):
                    if step_in_epoch < skip:
                        continue
                    images, labels = _split_batch(batch)
                    images = images.to(device=param.device, dtype=param.dtype)
                    labels = labels.to(device=param.device)
                    opt.zero_grad(set_to_none=True)
                    loss = training_loss(model, images, labels, label_smoothing)
                    loss.backward()
                    mask_gradients(model)
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                    opt.step()
                    sched.step()
                    apply_masks(model)
                    global_step += 1
                    loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
                    if checkpoint_every and global_step % checkpoint_every == 0:
                        checkpoint(epoch, step_in_epoch + 1)
                epoch_losses.append(loss_sum / max(1, loss_count))
                loss_sum, loss_count, skip, epoch = 0.0, 0, 0, epoch + 1
                checkpoint(epoch, 0)
    finally:
        bar.close()
        model.eval()
    result = FinetuneResult(settings=settings, steps=global_step, epoch_losses=epoch_losses,
                            resumed_from_step=resumed_from, seconds=time.perf_counter() - start)
    info = get_info(model)
    if info is not None and global_step > 0:
        info.finetune.append(settings)
        info.layer_sparsity, info.overall_sparsity = measured_sparsity(model)
    return result

