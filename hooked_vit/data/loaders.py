"""DataLoaders sized for the machine: a few CPU cores here, a GPU there."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from hooked_vit.data.dataset import LabelledImages, TensorImages

CPU_BATCH_SIZE = 64
CUDA_BATCH_SIZE = 256


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_batch_size(device: str | torch.device | None = None) -> int:
    """256 images per batch on a GPU, 64 on CPU."""
    return CUDA_BATCH_SIZE if resolve_device(device).type == "cuda" else CPU_BATCH_SIZE


def default_num_workers(dataset: Dataset, device: str | torch.device | None = None) -> int:
    """Decoding worker processes: none for in-memory images; for files on CPU, half the cores
    (the model's forward pass uses the others; 1 on a 2-core machine); feeding a GPU, all cores
    but one, at most 8."""
    if isinstance(dataset, LabelledImages) and isinstance(dataset.store, TensorImages):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if resolve_device(device).type == "cuda":
        return max(1, min(8, cores - 1))
    return max(1, cores // 2) if cores > 1 else 0


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader of ``(images [batch, channel, height, width], labels [batch])`` for ``device``:
    default batch size and workers from :func:`default_batch_size` / :func:`default_num_workers`,
    pinned memory when feeding CUDA, and a ``seed``-ed shuffle order when ``shuffle``."""
    device = resolve_device(device)
    workers = default_num_workers(dataset, device) if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=default_batch_size(device) if batch_size is None else batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        drop_last=drop_last,
    )

