"""Learning node masks (sec. 3.4, A.1, C): many classes' circuits trained together, the class
dimension being a batch dimension.

Per step, class ``c`` (mask row ``c``) gets ``batch_size`` of its train images and ``batch_size``
of the other classes' (a class drawn uniformly, then an image), each class from its own seeded
generator; all ``C * 2 * batch_size`` images run in one gated forward/backward, image ``i`` seeing
only mask row ``owner[i]``. The loss is the sum over classes of ``task_c + k * count_c``; as the
rows share no parameter and AdamW is elementwise, each row follows exactly its own objective, and
training C classes together equals training them one by one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from analyses.common.ablation import ActivationMeans, load_or_compute_means, means_path, model_key
from analyses.circuit.circuit import ClassCircuit
from analyses.circuit.config import CircuitConfig, resolve_k
from analyses.circuit.edges import dense_edge_count, edge_counts
from analyses.circuit.gates import NodeMasks
from analyses.circuit.metrics import EvalSet, accuracies, balanced_accuracy, ncq_edges, ncq_eq12, site_fractions
from analyses.circuit.replacement import gated_logits, site_references
from hooked_vit.bars import bars_enabled
from hooked_vit.data import LabelledImages, TensorImages, calibration_sample, class_vs_rest, train_val_split
from hooked_vit.errors import InvalidArgumentError

HISTORY_POINTS = 25


# ----------------------------------------------------------------------------- data
def class_seed(seed: int, class_id: int, stream: int) -> int:
    """The seed of one class's random stream (0: mask init, 1: batches, 2: eval draw)."""
    return (seed * 1_000_003 + class_id * 7_919 + stream) % (2**63)


class ClassBatches:
    """Balanced class-vs-rest batches for one class: ``batch_size`` positions of the class, then
    ``batch_size`` of the others (a class uniformly, then one of its images uniformly), with
    replacement, from a generator seeded by ``seed`` and the class."""

    def __init__(self, labels: Int[Tensor, "n"], class_id: int, batch_size: int, seed: int):
        self.batch_size = batch_size
        self.positives = torch.nonzero(labels == class_id).reshape(-1)
        others = [c for c in torch.unique(labels).tolist() if c != class_id]
        if self.positives.numel() == 0 or not others:
            raise InvalidArgumentError(f"class {class_id} needs train images of its own and of other classes "
                                       f"(has {self.positives.numel()} and {len(others)} other classes)")
        pools = [torch.nonzero(labels == c).reshape(-1) for c in others]
        self.pool = torch.cat(pools)
        self.counts = torch.tensor([p.numel() for p in pools])
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.generator = torch.Generator().manual_seed(class_seed(seed, class_id, 1))

    def draw(self) -> Int[Tensor, "two_batch"]:
        g, b = self.generator, self.batch_size
        pos = self.positives[torch.randint(self.positives.numel(), (b,), generator=g)]
        cls = torch.randint(self.counts.numel(), (b,), generator=g)
        within = (torch.rand(b, generator=g, dtype=torch.float64) * self.counts[cls]).long()
        return torch.cat([pos, self.pool[self.starts[cls] + within]])


def take_images(dataset: LabelledImages, positions: Int[Tensor, "n"]) -> Float[Tensor, "n channel height width"]:
    """Images at ``positions`` of ``dataset`` (indexing when it holds tensors, else loaded)."""
    if isinstance(dataset.store, TensorImages):
        return dataset.store.images[dataset.store_indices[positions]]
    return dataset.subset(positions).tensors(show_progress=False)[0]


def eval_set(dataset: LabelledImages, class_ids: Sequence[int], n: int | None, seed: int) -> EvalSet:
    """Per class, ``n`` val images of it and ``n`` of the others (default: all of its images; see
    :func:`hooked_vit.data.class_vs_rest`), concatenated with their mask row as ``owner``."""
    images, targets, owners = [], [], []
    for row, c in enumerate(class_ids):
        n_own = int((dataset.labels == c).sum())
        task = class_vs_rest(dataset, c, n=None if n is None else min(n, n_own), seed=class_seed(seed, c, 2) % 2**31)
        images.append(task.dataset.tensors(show_progress=False)[0])
        targets.append(task.is_target)
        owners.append(torch.full((task.is_target.numel(),), row, dtype=torch.long))
    return EvalSet(torch.cat(images), torch.cat(targets), torch.cat(owners), list(class_ids))


# ----------------------------------------------------------------------------- objective
def task_loss(
    logits: Float[Tensor, "n_masks batch n_classes"], class_ids: Int[Tensor, "n_masks"],
    labels: Int[Tensor, "n_masks batch"], kind: str,
) -> Float[Tensor, "n_masks"]:
    """Per mask row, the mean task loss over its images: ``"bce_margin"``, binary cross-entropy of
    ``logit_c - logsumexp(other logits)`` against ``label == c``; ``"ce_true_label"``,
    cross-entropy of all logits against the true label."""
    if kind == "ce_true_label":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(-1)
    index = class_ids.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    logit_c = logits.gather(-1, index).squeeze(-1)
    others = logits.scatter(-1, index, float("-inf")).logsumexp(-1)
    target = (labels == class_ids.view(-1, 1)).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logit_c - others, target, reduction="none").mean(-1)


def lr_schedule(optimizer: torch.optim.Optimizer, config: CircuitConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """``"step"``: x ``gamma`` at 1/3 and 2/3 of the steps (C.2's StepLR, gamma 0.2); ``"linear"``:
    linear decay to 0 (sec. 3.4)."""
    if config.schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / config.steps)
    milestones = [max(1, round(config.steps / 3)), max(1, round(2 * config.steps / 3))]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.gamma)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with no parameter requiring grad; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


# ----------------------------------------------------------------------------- training
@dataclass
class TrainedMasks:
    """Trained mask logits ``[n_masks n_units]`` and each row's sampled training history."""

    logits: Tensor
    history: list[list[dict[str, Any]]]
    seconds: float


@dataclass
class StepOutput:
    """One optimisation step: per mask row the task loss and active-node count (before the
    update), and the logits ``[n_masks, 2 batch_size, n_classes]`` it saw."""

    task: Tensor
    count: Tensor
    logits: Tensor


class MaskTrainer:
    """Mask logits of ``class_ids`` (row ``c`` initialised from its own seeded generator), their
    AdamW optimiser and schedule; :meth:`step` is one gated forward/backward/update of the model
    (which must be frozen, see :func:`frozen`) on images laid out ``[n_masks * 2 batch_size]``."""

    def __init__(self, model: nn.Module, class_ids: Sequence[int], config: CircuitConfig,
                 references: dict[str, Tensor], k: float):
        param = next(model.parameters())
        self.model, self.config, self.references, self.k = model, config, references, k
        rows = [NodeMasks(model.sites, 1, init_mean=config.init_mean, init_std=config.init_std,
                          generator=torch.Generator().manual_seed(class_seed(config.seed, c, 0))).logits.data
                for c in class_ids]
        self.masks = NodeMasks(model.sites, len(class_ids), device=param.device)
        with torch.no_grad():
            self.masks.logits.copy_(torch.cat(rows).to(param.device))
        self.n_masks, self.per_mask = len(class_ids), 2 * config.batch_size
        self.owner = torch.arange(self.n_masks, device=param.device).repeat_interleave(self.per_mask)
        self.classes = torch.tensor(list(class_ids), device=param.device)
        self.optimizer = torch.optim.AdamW([self.masks.logits], lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, config)

    def step(self, images: Float[Tensor, "batch channel height width"], labels: Int[Tensor, "batch"]) -> StepOutput:
        config = self.config
        gates = self.masks.gates(config.tau)  # [n_masks, n_units], exact 0/1
        logits = gated_logits(self.model, images, self.masks.split(gates), self.references, self.per_mask,
                              freeze_ln=config.freeze_ln).view(self.n_masks, self.per_mask, -1)
        task = task_loss(logits, self.classes, labels.view(self.n_masks, self.per_mask), config.loss)
        count = gates.sum(dim=-1)
        loss = (task + self.k * count).sum()  # rows share nothing: each follows its own objective
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.masks.clamp_(config.clamp)
        return StepOutput(task.detach(), count.detach(), logits.detach())


def train_masks(
    model: nn.Module,
    train: LabelledImages,
    class_ids: Sequence[int],
    config: CircuitConfig,
    references: dict[str, Tensor],
    k: float,
    *,
    show_progress: bool = True,
    desc: str = "circuit masks",
) -> TrainedMasks:
    """Train one mask row per class of ``class_ids`` together (see the module docstring); the
    progress bar shows the mean loss, node fraction and batch accuracy over the rows."""
    from tqdm.auto import tqdm

    param = next(model.parameters())
    batches = [ClassBatches(train.labels, c, config.batch_size, config.seed) for c in class_ids]
    every = max(1, config.steps // HISTORY_POINTS)
    history: list[list[dict[str, Any]]] = [[] for _ in class_ids]
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, delay=2.0, disable=not bars_enabled(show_progress), leave=False,
               dynamic_ncols=True)
    with frozen(model):
        trainer = MaskTrainer(model, class_ids, config, references, k)
        n_masks, n_units = trainer.n_masks, trainer.masks.n_units
        for step in bar:
            positions = torch.cat([b.draw() for b in batches])
            images = take_images(train, positions).to(device=param.device, dtype=param.dtype)
            labels = train.labels[positions].to(param.device)
            out = trainer.step(images, labels)
            record = step % every == 0 or step == config.steps - 1
            if record or show_progress:
                predicted = (out.logits.argmax(-1) == trainer.classes.view(-1, 1)).flatten()
                acc = balanced_accuracy(predicted, labels == trainer.classes.repeat_interleave(trainer.per_mask),
                                        trainer.owner, n_masks)
                loss = (out.task + k * out.count).cpu().double()
                node_frac = out.count.cpu().double() / n_units
                bar.set_postfix(loss=f"{float(loss.mean()):.3f}", nodes=f"{float(node_frac.mean()):.3f}",
                                acc=f"{float(acc.mean()):.3f}", refresh=False)
                if record:
                    for row in range(n_masks):
                        history[row].append({"step": step, "loss": float(loss[row]), "task_loss": float(out.task[row]),
                                             "node_frac": float(node_frac[row]), "batch_acc": float(acc[row])})
    bar.close()
    return TrainedMasks(trainer.masks.logits.detach().cpu(), history, time.perf_counter() - start)


# ----------------------------------------------------------------------------- metrics
def circuit_metrics(
    model: nn.Module,
    nodes: Bool[Tensor, "n_masks n_units"],
    data: EvalSet,
    references: dict[str, Tensor],
    config: CircuitConfig,
    *,
    acc_full: Tensor | None = None,
) -> list[dict[str, float]]:
    """Per mask row of ``nodes`` (bool ``[n_masks n_units]``): node and edge fractions, accuracy of
    the circuit, of the full model and of the complement on ``data``, both NCQs, collapse flag."""
    batch_size = config.eval_batch_size or 256
    kwargs = dict(freeze_ln=config.freeze_ln, batch_size=batch_size)
    with frozen(model):
        acc = accuracies(model, data, nodes, references, **kwargs)
        ablated = accuracies(model, data, nodes, references, complement=True, **kwargs)
        full = accuracies(model, data, None, references, **kwargs) if acc_full is None else acc_full
    edges = edge_counts(model, nodes)
    dense = dense_edge_count(model)
    out = []
    for row in range(nodes.shape[0]):
        node_frac = float(nodes[row].double().mean())
        edge_frac = float(edges[row]) / dense
        a, f, ab = float(acc[row]), float(full[row]), float(ablated[row])
        out.append({
            "node_frac": node_frac, "n_nodes": int(nodes[row].sum()), "edge_frac": edge_frac,
            "edges": int(edges[row]), "acc": a, "acc_full": f, "acc_ablated": ab,
            "ncq": ncq_edges(a, edge_frac), "ncq_eq12": ncq_eq12(a, f, node_frac),
            "collapsed": bool(f - a > config.collapse_drop or ab > config.collapse_ablated),
            "n_eval": int((data.owner == row).sum()),
        })
    return out


# ----------------------------------------------------------------------------- entry points
def prepare_means(
    model: nn.Module, train: LabelledImages, config: CircuitConfig, *,
    means_directory: str | os.PathLike | None = None, show_progress: bool = True,
) -> tuple[ActivationMeans | None, str | None]:
    """The site means of ``model`` over ``train`` (or a class-balanced ``n_means_images`` sample of
    it), loaded or computed by :func:`analyses.common.ablation.load_or_compute_means`, and their file;
    ``(None, None)`` for ``reference="zero"``."""
    if config.reference == "zero":
        return None, None
    data = train if config.n_means_images is None else calibration_sample(train, config.n_means_images,
                                                                          seed=config.seed)
    means = load_or_compute_means(model, data, directory=means_directory, hooks=model.sites.hook_names,
                                  batch_size=config.eval_batch_size, show_progress=show_progress)
    return means, str(means_path(model, data, means_directory).resolve())


def model_sparsity(model: nn.Module) -> float:
    """The requested pruning sparsity of ``model`` (0 when dense)."""
    info = getattr(model, "pruning_info", None)
    return float(info.sparsity) if info is not None else 0.0


def discover_circuits(
    model: nn.Module,
    train: LabelledImages,
    class_ids: Sequence[int | str],
    config: CircuitConfig | None = None,
    *,
    val: LabelledImages | None = None,
    means: ActivationMeans | None = None,
    k: float | None = None,
    sparsity: float | None = None,
    means_directory: str | os.PathLike | None = None,
    show_progress: bool = True,
    desc: str = "circuit masks",
) -> list[ClassCircuit]:
    """Circuits of ``class_ids`` (indices, ids or names) in ``model``, trained together on
    ``train`` and measured on ``val`` (default: a stratified 20 % of ``train`` held out from the
    optimiser, seeded by ``config.seed``). ``means``: the replacement means (default: computed over
    ``train``, or loaded from ``means_directory``). ``k`` overrides :func:`resolve_k`; ``desc``
    labels the progress bar."""
    config = config or CircuitConfig()
    if not class_ids:
        raise InvalidArgumentError("class_ids must name at least one class")
    ids = [train.class_index(c) for c in class_ids]
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError(f"class_ids {list(class_ids)} name a class twice")
    if val is None:
        train, val = train_val_split(train, val_fraction=0.2, seed=config.seed)
    for c in ids:
        for name, data in (("train", train), ("val", val)):
            if not bool((data.labels == c).any()):
                raise InvalidArgumentError(f"class {c} ({train.class_names[c]}) has no images in the {name} "
                                           f"images {data!r}")
    sparsity = model_sparsity(model) if sparsity is None else float(sparsity)
    k = resolve_k(config, sparsity) if k is None else float(k)
    if not (math.isfinite(k) and k >= 0):
        raise InvalidArgumentError(f"k={k!r} is invalid: must be a finite number >= 0")
    stored_means = None
    if means is None:
        means, stored_means = prepare_means(model, train, config, means_directory=means_directory,
                                            show_progress=show_progress)
    param = next(model.parameters())
    references = site_references(model, config.reference,
                                 means.to(param.device, param.dtype) if means is not None else None)
    trained = train_masks(model, train, ids, config, references, k, show_progress=show_progress, desc=desc)
    nodes = trained.logits > 0
    metrics = circuit_metrics(model, nodes, eval_set(val, ids, config.n_eval, config.seed), references, config)
    key = model_key(model)
    circuits = []
    for row, c in enumerate(ids):
        node_dict = {site.hook_name: part.clone() for site, part in zip(model.sites, nodes[row].split(
            [s.width for s in model.sites]))}
        record = {**metrics[row], "train_seconds": trained.seconds / len(ids),
                  "site_fractions": site_fractions(list(model.sites), nodes[row])}
        circuits.append(ClassCircuit(c, train.class_names[c], node_dict, trained.logits[row].clone(), record, k, sparsity,
                                key, config, trained.history[row], stored_means, references))
    return circuits


def discover_circuit(
    model: nn.Module,
    train: LabelledImages,
    class_id: int | str,
    config: CircuitConfig | None = None,
    **kwargs,
) -> ClassCircuit:
    """The circuit of one class (see :func:`discover_circuits` for the options)."""
    return discover_circuits(model, train, [class_id], config, **kwargs)[0]
