"""The Machine Interpretability Score (Zimmermann, Klindt & Brendel, NeurIPS 2024).

For a task with max/min queries ``q+``/``q-`` and max/min reference sets ``E+``/``E-``, with
``s(q, E)`` the mean similarity of ``q`` to the images of ``E``, the margin is

    margin = [s(q+, E+) - s(q+, E-)] - [s(q-, E+) - s(q-, E-)]

(how much better the max query matches the max references than the min query does), the
predicted probability that the task is answered correctly is ``sigmoid(margin / temperature)``,
and a unit's MIS is that probability averaged over its tasks. The temperature defaults to the
value the public implementations ship (0.16, see ``docs/mis.md``) and can be refit on human
answers (:func:`fit_temperature`: the maximum-likelihood temperature of a one-parameter logistic
model of correct/incorrect given the margin).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.mis.config import PAPER_TEMPERATURE
from analyses.mis.similarity import EmbeddingCache
from hooked_vit.errors import InvalidArgumentError, MissingFileError, check

SHARE_THRESHOLD = 0.8


@dataclass
class MISScores:
    """Per unit ``mis`` ``[unit]``; per task ``margin`` and ``probability`` ``[unit task]``;
    ``constant`` units (excluded from :meth:`summary`); ``tied`` (sparse) units, whose max pool
    reaches the activation of their min pool (counted); the ``similarity`` backend and the
    ``temperature`` used (``temperature_source``: ``"default"`` or the CSV it was refit on)."""

    mis: Float[Tensor, " unit"]
    margin: Float[Tensor, "unit task"]
    probability: Float[Tensor, "unit task"]
    constant: Bool[Tensor, " unit"]
    tied: Bool[Tensor, " unit"]
    similarity: str
    temperature: float
    temperature_source: str = "default"

    def summary(self) -> dict[str, Any]:
        """Mean, median and share above 0.8 of the MIS over the non-constant units, with the counts
        (``n_tied``: the non-constant tied units, included; ``mean_untied``: the mean without them)
        and the backend."""
        kept, untied = self.mis[~self.constant], self.mis[~self.constant & ~self.tied]
        n = int(kept.numel())
        return {"n_units": n, "n_constant": int(self.constant.sum()), "n_tied": int((self.tied & ~self.constant).sum()),
                "mean": float(kept.mean()) if n else float("nan"),
                "median": float(kept.median()) if n else float("nan"),
                "share_above_0.8": float((kept > SHARE_THRESHOLD).float().mean()) if n else float("nan"),
                "mean_untied": float(untied.mean()) if untied.numel() else float("nan"),
                "similarity": self.similarity, "temperature": self.temperature,
                "temperature_source": self.temperature_source}


def task_margins(embeddings: Float[Tensor, "n_images d"], draws: Any, *, chunk: int = 64) -> Float[Tensor, "unit task"]:
    """Every task's margin (module docstring) from unit-norm image ``embeddings``; the mean
    similarity to a reference set is the cosine with the set's mean embedding (an embedding bag: the
    reference embeddings are never gathered). ``chunk`` units at a time bound the memory."""
    import torch.nn.functional as F

    parts = []
    for start in range(0, draws.max_query.shape[0], chunk):
        rows = slice(start, start + chunk)
        q_max, q_min = embeddings[draws.max_query[rows]], embeddings[draws.min_query[rows]]  # [u t d]
        u, t, k = draws.max_refs[rows].shape
        e_max = F.embedding_bag(draws.max_refs[rows].reshape(-1, k), embeddings, mode="mean").view(u, t, -1)
        e_min = F.embedding_bag(draws.min_refs[rows].reshape(-1, k), embeddings, mode="mean").view(u, t, -1)

        def s(q: Tensor, e: Tensor) -> Tensor:
            return (q * e).sum(-1)

        parts.append((s(q_max, e_max) - s(q_max, e_min)) - (s(q_min, e_max) - s(q_min, e_min)))
    return torch.cat(parts)


def read_human_answers(path: str | os.PathLike) -> dict[str, list[bool]]:
    """``task_id -> [correct, ...]`` (one per answer) from a CSV with columns ``task_id`` and ``correct`` (1/0, true/false)."""
    import csv

    if not os.path.isfile(path):
        raise MissingFileError(f"human answers {path} do not exist: give a CSV with columns task_id, correct")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    if not rows or not {"task_id", "correct"} <= set(rows[0]):
        raise InvalidArgumentError(f"{path} must be a CSV with columns task_id, correct (one row per answer)")
    truth = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    answers = {}
    for row in rows:
        value = str(row["correct"]).strip().lower()
        if value not in truth:
            raise InvalidArgumentError(f"{path}: correct must be 1/0 or true/false, got {row['correct']!r}")
        answers.setdefault(row["task_id"].strip(), []).append(truth[value])
    return answers


def refit_temperature(human_csv: str | os.PathLike, margins: dict[str, float]) -> float:
    """:func:`fit_temperature` on the answers of ``human_csv`` (:func:`read_human_answers`), given the
    margin of every task that may have been answered (``task_id -> margin``)."""
    answers = read_human_answers(human_csv)
    unknown = sorted(set(answers) - set(margins))
    if unknown:
        raise InvalidArgumentError(f"{human_csv}: task ids {unknown[:3]} are not among these tasks' ids (such as "
                                   f"{', '.join(list(margins)[:2])})")
    pairs = [(margins[task], c) for task, cs in answers.items() for c in cs]
    return fit_temperature(torch.tensor([m for m, _ in pairs], dtype=torch.float64),
                           torch.tensor([c for _, c in pairs]))


def fit_temperature(margins: Float[Tensor, " n"], correct: Bool[Tensor, " n"], *, iterations: int = 100) -> float:
    """The maximum-likelihood temperature of ``P(correct) = sigmoid(margin / temperature)`` (Newton's
    method on the slope ``1 / temperature``, which the log-likelihood is concave in)."""
    margins, y = margins.double().reshape(-1), correct.double().reshape(-1)
    check(margins.numel() == y.numel() and margins.numel() > 0, "margins and answers must be non-empty and as many")
    if bool((y == 1).all()) or bool((y == 0).all()) or bool((margins == 0).all()):
        raise InvalidArgumentError("the human answers must hold both correct and incorrect ones (and non-zero "
                                   "margins) for the temperature to be finite")
    slope = torch.tensor(1.0 / PAPER_TEMPERATURE, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(slope * margins)
        grad, hess = ((y - p) * margins).sum(), -(p * (1 - p) * margins**2).sum()
        step = grad / hess
        slope = slope - step
        if abs(float(step)) < 1e-10:
            break
    if not float(slope) > 0:
        raise InvalidArgumentError(f"the human answers are anti-correlated with the margins (fitted slope "
                                   f"{float(slope):.3g} <= 0): no positive temperature fits them")
    return float(1.0 / slope)


def machine_interpretability_score(tasks: Any, similarity: str = "pixels", *, temperature: float = PAPER_TEMPERATURE,
                                   human_csv: str | os.PathLike | None = None, embeddings: EmbeddingCache | None = None,
                                   batch_size: int = 256) -> MISScores:
    """The MIS of every unit of ``tasks`` (:func:`~analyses.mis.tasks.make_tasks`) under backend
    ``similarity`` (``"pixels"``, ``"features:ALIAS"``, ``"dreamsim"``). ``human_csv`` (columns
    ``task_id`` as :meth:`Tasks.task_ids`, ``correct``) refits the temperature on those tasks;
    ``embeddings`` shares the per-image embeddings between calls on the same images."""
    check(isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0,
          f"temperature must be a number > 0, got {temperature!r}")
    cache = embeddings if embeddings is not None else EmbeddingCache()
    vectors = cache(similarity, tasks.images, mean=tasks.mean, std=tasks.std, batch_size=batch_size)
    margin = task_margins(vectors, tasks.draws)
    source = "default"
    if human_csv is not None:
        temperature = refit_temperature(human_csv, dict(zip(tasks.task_ids(), margin.reshape(-1).tolist())))
        source = os.fspath(human_csv)
    probability = torch.sigmoid(margin / temperature)
    return MISScores(probability.mean(dim=1), margin, probability, tasks.constant, tasks.tied, similarity,
                     float(temperature), source)


__all__ = [
    "SHARE_THRESHOLD",
    "MISScores",
    "fit_temperature",
    "machine_interpretability_score",
    "read_human_answers",
    "refit_temperature",
    "task_margins",
]
