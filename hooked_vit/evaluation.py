"""Classification accuracy of a model on a labelled image dataset, with or without hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.data import Dataset

from hooked_vit.data.loaders import make_loader
from hooked_vit.data.progress import progress as progress_bar

FwdHooks = Sequence[tuple[str | Callable, Callable]]


def topk_correct(logits: Float[Tensor, "batch n_classes"], labels: Int[Tensor, "batch"], k: int) -> int:
    """Number of rows whose label is among the ``k`` largest logits (``k`` capped at n_classes)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return int((top == labels[:, None]).any(dim=-1).sum())


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    fwd_hooks: FwdHooks | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> dict[str, float | int]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]), mean cross-entropy ``loss`` (nats) and ``n``
    (images) of ``model`` on ``dataset`` (items ``(image [channel, height, width], label)``).

    ``model`` maps images ``[batch, channel, height, width]`` to logits ``[batch, n_classes]``
    (a HookedViT, or a plain timm model when no hooks are given). With ``fwd_hooks`` (TransformerLens
    ``[(hook name or filter, hook fn), ...]``) every batch runs through
    ``model.run_with_hooks(images, fwd_hooks=fwd_hooks)``. Runs on the model's device (a given
    ``device`` moves the model there first) in eval mode under ``torch.no_grad()``; the model's
    train/eval mode is restored afterwards.
    Batch size and loader workers default to :func:`hooked_vit.data.make_loader`'s choice for the
    device; a progress bar appears if the pass takes more than a couple of seconds.
    """
    if device is not None:
        model.to(device)
    param = next(model.parameters())
    device = param.device
    if fwd_hooks is not None and not hasattr(model, "run_with_hooks"):
        raise TypeError(f"fwd_hooks need a hooked model with run_with_hooks (a HookedViT), got {type(model).__name__}")
    expected = getattr(dataset, "num_classes", None)
    loader = make_loader(dataset, batch_size=batch_size, device=device, num_workers=num_workers)
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    try:
        with torch.no_grad():
            for images, labels in progress_bar(loader, desc=f"evaluate {getattr(dataset, 'name', '')}".rstrip(),
                                               total=len(loader), enabled=progress):
                images = images.to(device=device, dtype=param.dtype, non_blocking=True)
                labels = labels.to(device=device, non_blocking=True)
                logits = model.run_with_hooks(images, fwd_hooks=list(fwd_hooks)) if fwd_hooks else model(images)
                if expected is not None and logits.shape[-1] != expected:
                    raise ValueError(
                        f"model outputs {logits.shape[-1]} classes but dataset {getattr(dataset, 'name', '')!r} has "
                        f"{expected}; evaluate a model on data of its own label space"
                    )
                logits = logits.float()
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct1 += topk_correct(logits, labels, 1)
                correct5 += topk_correct(logits, labels, 5)
                n += labels.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": n}
