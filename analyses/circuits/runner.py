"""The circuit level over a model family: every class's circuit in the dense model and its pruned
variants (and optionally a random-weight control), saved one by one and resumable, summarised as
the paper's Table 3 (and Table 7 for a k sweep) with figures.

Layout of ``out``::

    config.json                                  settings every circuit below depends on
    means/                                       per-model site means (safetensors)
    sparsity_<s>/k_<k>/class_<c>/                one Circuit (nodes.safetensors, circuit.json)
    random_control/k_<k>/class_<c>/              the random-weight control
    result.json, per_class.csv, table3.csv/.md, table7.csv/.md, metrics.png, heatmap.png
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from analyses.common.ablation import model_key
from analyses.circuits.circuit import Circuit
from analyses.circuits.config import CircuitConfig, resolve_k
from analyses.circuits.discovery import discover_circuits, prepare_means
from analyses.common.units import Shard
from analyses.common.variants import load_model, sparsity_dir
from analyses.neuron.level import resolve_classes
from analyses.common.results import AnalysisResult, markdown_table, read_json, write_json
from hooked_vit import atomic
from hooked_vit.data import LabelledImages, load_dataset
from hooked_vit.errors import InvalidArgumentError

CONFIG_FILE = "config.json"
RANDOM_LABEL = "random weights"
SUMMARY_METRICS: tuple[str, ...] = ("node_frac", "edge_frac", "acc", "acc_full", "acc_ablated", "ncq", "ncq_eq12")


def model_label(sparsity: float, method: str, random: bool = False) -> str:
    """``"dense"``, ``"wanda 0.3"`` or ``"random weights"``."""
    if random:
        return RANDOM_LABEL
    return "dense" if float(sparsity) == 0.0 else f"{method} {float(sparsity):g}"


def k_dir(model_dir: Path, k: float) -> Path:
    return model_dir / f"k_{k:g}"


def check_run_directory(out: Path, config: CircuitConfig, *, write: bool = True) -> None:
    """Check that ``out/config.json``, if present, has the same settings (fields that change
    circuits) as ``config`` -- a differing one is an error naming the fields -- and, with
    ``write``, write it when absent."""
    wanted = {"model": config.model, **config.settings(), "k": config.k}
    path = out / CONFIG_FILE
    if path.is_file():
        stored = read_json(path)
        differing = sorted(key for key in set(stored) | set(wanted) if stored.get(key) != wanted.get(key))
        if differing:
            detail = ", ".join(f"{key}: {stored.get(key)!r} there, {wanted.get(key)!r} now" for key in differing)
            raise InvalidArgumentError(f"{out} holds circuits made with a different config ({detail}); "
                                       "use another --out or the same settings")
    elif write:
        write_json(path, wanted)


def load_random_model(config: CircuitConfig) -> nn.Module:
    """``config.model``'s architecture with random weights (seeded by ``config.seed``): the control."""
    from hooked_vit import HookedViT
    from hooked_vit.data import resolve_device

    return HookedViT.from_pretrained(config.model, pretrained=False, seed=config.seed,
                                     device=resolve_device(config.device))


def _row(label: str, sparsity: float, circuit: Circuit) -> dict[str, Any]:
    return {"model": label, "sparsity": sparsity, "k": circuit.k, "class": circuit.class_id,
            "class_name": circuit.class_name, **circuit.metrics}


def model_circuits(
    model: nn.Module,
    label: str,
    sparsity: float,
    ks: Sequence[float],
    classes: Sequence[int],
    config: CircuitConfig,
    train: LabelledImages,
    val: LabelledImages,
    *,
    directory: Path | None,
    means_directory: Path | None,
    show_progress: bool,
) -> list[dict[str, Any]]:
    """Rows (one per k and class) of one model; with ``directory``, each circuit is saved as soon
    as its class batch is done and circuits saved before are reused."""
    key = model_key(model)
    rows: list[dict[str, Any]] = []
    means = stored = None
    for k in ks:
        done: dict[int, Circuit] = {}
        if directory is not None:
            for c in classes:
                path = k_dir(directory, k) / f"class_{c}"
                if Circuit.is_saved(path):
                    circuit = Circuit.load(path)
                    if circuit.model_key != key:
                        raise InvalidArgumentError(f"{path} was made on weights {circuit.model_key}, but {label} "
                                               f"now loads as {key}: the model changed; use another --out")
                    done[c] = circuit
        pending = [c for c in classes if c not in done]
        step = config.class_batch or max(len(pending), 1)
        for start in range(0, len(pending), step):
            chunk = pending[start:start + step]
            if means is None and config.reference != "zero":
                means, stored = prepare_means(model, train, config, means_directory=means_directory,
                                              show_progress=show_progress)
            found = discover_circuits(model, train, chunk, config, val=val, means=means, k=k, sparsity=sparsity,
                                      show_progress=show_progress,
                                      desc=f"{label}, k={k:g}, classes {chunk[0]}..{chunk[-1]}")
            for circuit in found:
                circuit.means_path = stored
                if directory is not None:
                    circuit.save(k_dir(directory, k) / f"class_{circuit.class_id}")
                done[circuit.class_id] = circuit
        rows += [_row(label, sparsity, done[c]) for c in classes]
    return rows


def run_circuits(
    config: CircuitConfig,
    out: str | os.PathLike | None = None,
    *,
    model_loader: Callable[[CircuitConfig, float], nn.Module] = load_model,
    random_loader: Callable[[CircuitConfig], nn.Module] = load_random_model,
    train: LabelledImages | None = None,
    val: LabelledImages | None = None,
    means_directory: str | os.PathLike | None = None,
    shard: Shard = Shard(),
    show_progress: bool = True,
) -> CircuitResult | None:
    """Circuits of ``config.classes`` for every model of ``config.sparsities`` (and the random
    control), at each model's ``k`` (Table 3) and every ``config.sweep_k`` (Table 7). With ``out``
    every circuit is saved as it is found, a rerun resumes, and the tables and figures are
    written there. ``train``/``val`` replace ``config.dataset``'s splits (e.g. tensors in tests).
    With a partial ``shard``, only its share of the (model, class) units is found and saved, and
    nothing is returned."""
    start = time.perf_counter()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        check_run_directory(out_dir, config, write=False)
    if means_directory is None and out_dir is not None:
        means_directory = out_dir / "means"
    variants: list[tuple[str, float, Callable[[], nn.Module], Path | None]] = [
        (model_label(s, config.method), float(s), (lambda s=s: model_loader(config, float(s))),
         sparsity_dir(out_dir, s) if out_dir is not None else None) for s in config.sparsities]
    if config.random_control:
        variants.append((RANDOM_LABEL, 0.0, lambda: random_loader(config),
                         out_dir / "random_control" if out_dir is not None else None))
    rows: list[dict[str, Any]] = []
    keys: dict[str, str] = {}
    classes: list[int] | None = None
    for index, (label, sparsity, load, directory) in enumerate(variants):
        model = load()
        if train is None or val is None:
            train = train if train is not None else load_dataset(config.dataset, split=config.train_split, model=model)
            val = val if val is not None else load_dataset(config.dataset, split=config.val_split, model=model)
        if classes is None:
            classes = resolve_classes(val, config.classes)
            resolve_classes(train, classes)
            if out_dir is not None:  # the inputs are valid: claim the directory
                check_run_directory(out_dir, config)
        ks = list(dict.fromkeys([resolve_k(config, sparsity), *(config.sweep_k or ())]))
        mine = shard.take(classes, index)
        rows += model_circuits(model, label, sparsity, ks, mine, config, train, val, directory=directory,
                               means_directory=Path(means_directory) if means_directory is not None else None,
                               show_progress=show_progress)
        keys[label] = model_key(model)
        del model
    if not shard.whole:
        return None
    result = CircuitResult(config, rows, keys, time.perf_counter() - start)
    if out_dir is not None:
        result.save(out_dir)
    return result


# ----------------------------------------------------------------------------- result
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    import statistics

    return (statistics.fmean(values), statistics.pstdev(values)) if values else (float("nan"), float("nan"))


@dataclass
class CircuitResult(AnalysisResult):
    """Circuit-level results: ``rows`` has one entry per (model, k, class) with the circuit's
    metrics (see :func:`analyses.circuits.discovery.circuit_metrics`) and its active fraction per
    site (``site_fractions``); ``model_keys`` names the weights of each model label."""

    CONFIG_CLASS: ClassVar[type] = CircuitConfig
    config: CircuitConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_keys: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    def table3_k(self, label: str) -> float:
        """The k of ``label``'s Table 3 row (its preset or ``config.k``)."""
        if label == RANDOM_LABEL:
            return resolve_k(self.config, 0.0)
        sparsity = next(r["sparsity"] for r in self.rows if r["model"] == label)
        return resolve_k(self.config, sparsity)

    def select(self, label: str, k: float) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["model"] == label and r["k"] == k]

    def summary_row(self, label: str, k: float) -> dict[str, Any]:
        rows = self.select(label, k)
        out: dict[str, Any] = {"model": label, "k": k, "n_classes": len(rows)}
        for metric in SUMMARY_METRICS:
            out[f"{metric}_mean"], out[f"{metric}_std"] = _mean_std([r[metric] for r in rows])
        out["n_collapsed"] = sum(bool(r["collapsed"]) for r in rows)
        return out

    def table3(self) -> list[dict[str, Any]]:
        """Per model at its k: mean and std over classes of every metric, and the collapsed count."""
        return [self.summary_row(label, self.table3_k(label)) for label in self.models]

    def table7(self) -> list[dict[str, Any]]:
        """Per model and swept k (``config.sweep_k``): the same summary."""
        return [self.summary_row(label, float(k)) for label in self.models for k in (self.config.sweep_k or ())
                if self.select(label, float(k))]

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        per_class = [{k: v for k, v in r.items() if k != "site_fractions"} for r in self.rows]
        tables = {"per_class": per_class, "table3": self.table3()}
        if self.config.sweep_k:
            tables["table7"] = self.table7()
        return tables

    def markdown(self, rows: Sequence[dict[str, Any]] | None = None) -> str:
        """Table 3 (or ``rows``) in the paper's form, in %: Node, Size, Acc, NCQ, plus the full
        model's and the complement's accuracy, NCQ as eq. 12 and the collapsed classes."""
        def pm(row: dict[str, Any], metric: str, scale: float = 100.0, digits: int = 2) -> str:
            return f"{scale * row[f'{metric}_mean']:.{digits}f} ± {scale * row[f'{metric}_std']:.{digits}f}"

        rows = self.table3() if rows is None else rows
        return markdown_table([{
            "Model": r["model"], "k": f"{r['k']:g}", "classes": r["n_classes"], "Node (%)": pm(r, "node_frac"),
            "Size (%)": pm(r, "edge_frac"), "Acc. (%)": pm(r, "acc"), "NCQ": pm(r, "ncq", 1.0, 3),
            "Acc. full (%)": pm(r, "acc_full"), "Ablated acc. (%)": pm(r, "acc_ablated"),
            "NCQ eq. 12": pm(r, "ncq_eq12", 1.0, 3), "collapsed": r["n_collapsed"],
        } for r in rows])

    def save(self, directory: str | os.PathLike) -> Path:
        """``result.json``, ``per_class.csv``, ``table3.csv/.md``, ``table7.csv/.md`` (k sweep),
        ``metrics.png`` and ``heatmap.png``."""
        from analyses.circuits.figures import plot_heatmap, plot_metrics

        directory = super().save(directory)
        header = f"<!-- {self.config_comment()} -->\n\n"
        atomic.write_text(directory / "table3.md", header + self.markdown() + "\n")
        if self.config.sweep_k:
            atomic.write_text(directory / "table7.md", header + self.markdown(self.table7()) + "\n")
        plot_metrics(self, directory / "metrics.png")
        plot_heatmap(self, directory / "heatmap.png")
        return directory


__all__ = ["CircuitResult", "check_run_directory", "load_model", "load_random_model", "model_circuits",
           "resolve_classes", "run_circuits"]
