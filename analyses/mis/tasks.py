"""The 2AFC tasks of the psychophysics experiment (Zimmermann, Klein & Brendel 2023; Borowski et al.
2021), per unit, drawn from its activation on every image.

For a unit with activations ``a`` over ``n`` images: the ``ceil(quantile * n)`` most activating
images (sorted by decreasing activation; tied activations in a seeded random order of the images,
one order shared by the units, as the public MIS re-implementations shuffle the images first) form
its max pool, the as many least activating its min pool. Each task draws ``n_references + 1`` distinct images from each pool
(uniformly, seeded); of the max draw, the ``n_references`` most activating are the max references
and the remaining (least activating) one is the max query; of the min draw, the ``n_references``
least activating are the min references and the remaining one the min query. A person (or the
MIS) sees both reference sets and must tell which query is the max query.

A sparse unit (a ReLU or TopK latent active on fewer than ``ceil(quantile * n)`` images) has the
same activation (its floor, usually 0) at the bottom of its max pool and in its min pool: some of
its tasks then pair a max query with a min query of equal activation, which no one can answer
better than chance; with the random tie order such tasks score 0.5 on average instead of an
artefact of the image order. :attr:`Tasks.tied` marks these units (reported, not excluded).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vit import atomic
from hooked_vit.errors import InvalidArgumentError, check


@dataclass(frozen=True)
class TaskDraws:
    """Image indices of every task: ``max_refs``/``min_refs`` ``[unit task n_references]``,
    ``max_query``/``min_query`` ``[unit task]``."""

    max_refs: Int[Tensor, "unit task k"]
    min_refs: Int[Tensor, "unit task k"]
    max_query: Int[Tensor, "unit task"]
    min_query: Int[Tensor, "unit task"]


def draw_tasks(activations: Float[Tensor, "n_images n_units"], *, n_tasks: int, n_references: int, quantile: float,
               seed: int) -> TaskDraws:
    """Every unit's ``n_tasks`` tasks (module docstring), vectorised over units and tasks."""
    n_images, n_units = activations.shape
    pool = math.ceil(quantile * n_images)
    if pool < n_references + 1:
        raise InvalidArgumentError(f"the {quantile:g} quantile of {n_images} images holds {pool} images, fewer than "
                                   f"n_references + 1 = {n_references + 1}: use more images or a larger quantile")
    generator = torch.Generator().manual_seed(int(seed))
    picks_max = torch.rand(n_units, n_tasks, pool, generator=generator).argsort(dim=-1)[..., :n_references + 1]
    picks_min = torch.rand(n_units, n_tasks, pool, generator=generator).argsort(dim=-1)[..., :n_references + 1]
    shuffle = torch.randperm(n_images, generator=generator)  # the order of tied activations
    order = shuffle[torch.sort(activations.T[:, shuffle], dim=1, descending=True, stable=True).indices]  # [unit n]
    # positions in the sorted order: max pool = ranks 0..pool-1 (descending), min pool = the last ranks, least first
    ranks_max = picks_max.sort(dim=-1).values
    ranks_min = (n_images - 1 - picks_min).sort(dim=-1, descending=True).values
    top = torch.gather(order.unsqueeze(1).expand(-1, n_tasks, -1), 2, ranks_max)
    bottom = torch.gather(order.unsqueeze(1).expand(-1, n_tasks, -1), 2, ranks_min)
    return TaskDraws(top[..., :n_references], bottom[..., :n_references], top[..., n_references],
                     bottom[..., n_references])


@dataclass
class Tasks:
    """The tasks of some units: which units (``units``, a :class:`~hooked_vit.units.SiteUnits`), the
    model-ready ``images`` they index (with ``mean``/``std`` to undo the normalisation when
    exporting), every unit's ``activations``, the ``draws`` and the settings (``n_tasks``,
    ``n_references``, ``quantile``, ``seed``). ``constant[u]`` marks a unit whose activation does
    not vary (max - min < 1e-8, as the 2024 paper excludes them); ``tied[u]`` one whose max pool
    reaches down to the activation of its min pool (a sparse unit: some tasks are undecidable)."""

    units: Any
    images: Float[Tensor, "n_images channel height width"]
    activations: Float[Tensor, "n_images n_units"]
    draws: TaskDraws
    n_tasks: int
    n_references: int
    quantile: float
    seed: int
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def n_units(self) -> int:
        return self.activations.shape[1]

    @property
    def constant(self) -> torch.Tensor:
        return (self.activations.amax(0) - self.activations.amin(0)) < 1e-8

    @property
    def tied(self) -> torch.Tensor:
        pool = math.ceil(self.quantile * self.activations.shape[0])
        ordered = self.activations.sort(dim=0, descending=True).values
        return ordered[pool - 1] <= ordered[-pool]

    def task_ids(self) -> list[str]:
        """Each task's id, unit-major: ``task_<u>/trial_<t>`` (1-based, the exported folders)."""
        return [f"task_{u + 1}/trial_{t + 1}" for u in range(self.n_units) for t in range(self.n_tasks)]

    def settings(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "n_references": self.n_references, "quantile": self.quantile,
                "seed": self.seed, "n_images": int(self.images.shape[0]), **self.units.describe()}

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the tasks in the human experiment's trial layout, the folder whole or not at all:
        ``<dir>/index.json`` (settings and unit of each task) and, per unit ``u`` and trial ``t``,
        ``task_<u>/index.json`` and ``task_<u>/trials/trial_<t>/queries/{max,min}.png`` +
        ``references/{max_i,min_i}.png`` (``i`` from 0; images with the normalisation undone)."""
        from PIL import Image

        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        pixels = ((self.images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

        def save(index: int, path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            image = pixels[index]
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)

        draws = self.draws
        with atomic.atomic_directory(directory, replace=True) as tmp:
            for u in range(self.n_units):
                folder = tmp / f"task_{u + 1}"
                for t in range(self.n_tasks):
                    trial = folder / "trials" / f"trial_{t + 1}"
                    save(int(draws.max_query[u, t]), trial / "queries" / "max.png")
                    save(int(draws.min_query[u, t]), trial / "queries" / "min.png")
                    for i in range(self.n_references):
                        save(int(draws.max_refs[u, t, i]), trial / "references" / f"max_{i}.png")
                        save(int(draws.min_refs[u, t, i]), trial / "references" / f"min_{i}.png")
                atomic.write_json(folder / "index.json", {
                    "task_name": f"task_{u + 1}", "n_reference_images": self.n_references, "n_trials": self.n_tasks,
                    "unit": int(self.units.indices[u]), "hook_name": self.units.hook_name})
            atomic.write_json(tmp / "index.json", {**self.settings(), "n_tasks_folders": self.n_units})
        return Path(directory)


def make_tasks(model: Any, units: Any, dataset: Any, config: Any, *,
               activations: Float[Tensor, "n_images n_units"] | None = None) -> Tasks:
    """The tasks of ``units`` (:meth:`HookedViT.units`) on ``dataset`` (a
    :class:`~hooked_vit.data.LabelledImages` or a model-ready image tensor), as ``config`` (a
    :class:`~analyses.mis.config.MISConfig`) sets them; ``activations`` (``[n_images n_units]``)
    skips the forward pass when already computed."""
    images = dataset if isinstance(dataset, torch.Tensor) else dataset.tensors(show_progress=False)[0]
    check(images.ndim == 4, f"dataset must give images [n, channel, height, width], got shape {list(images.shape)}")
    if activations is None:
        activations = units.activations(model, images, batch_size=config.batch_size)
    check(tuple(activations.shape) == (images.shape[0], len(units)),
          f"activations must be [n_images, n_units] = [{images.shape[0]}, {len(units)}], got {list(activations.shape)}")
    draws = draw_tasks(activations, n_tasks=config.n_tasks, n_references=config.n_references,
                       quantile=config.quantile, seed=config.seed)
    prep = getattr(getattr(model, "cfg", None), "preprocessing", {}) or {}
    channels = images.shape[1]
    return Tasks(units, images, activations, draws, config.n_tasks, config.n_references, float(config.quantile),
                 int(config.seed), tuple(prep.get("mean", (0.0,) * channels)), tuple(prep.get("std", (1.0,) * channels)))


__all__ = ["TaskDraws", "Tasks", "draw_tasks", "make_tasks"]
