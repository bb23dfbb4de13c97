"""Circuit level (IMPACT Table 3; Table 7 for a k sweep): every class's circuit in the dense model
and its pruned variants (and optionally a random-weight control), one unit per k and class.

Layout of ``out``::

    config.json                                  settings every circuit below depends on
    means/                                       per-model site means (safetensors)
    sparsity_<s>/k_<k>/class_<c>.json            one unit: the circuit's row of the result
    sparsity_<s>/k_<k>/class_<c>/                the circuit itself (nodes.safetensors, circuit.json)
    random_control/k_<k>/...                     the random-weight control
    result.json, per_class.csv, table3.csv/.md, table7.csv/.md, metrics.png, heatmap.png, done.json

A model's k is its preset's (dense or sparse, :func:`~analyses.circuit.config.resolve_k`) unless
``k`` is given, plus every ``sweep_k``: its units are its k values x the classes. Classes are trained
``class_batch`` at a time (default: all of a k that this process has left to compute, the driver's
:attr:`~analyses.common.level.Level.pending`): the first unit of a batch trains the whole batch and
the others are handed out from ``data`` as the driver asks for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analyses.circuit.config import CircuitConfig, resolve_k
from analyses.circuit.result import CircuitResult
from analyses.common.labels import RANDOM_LABEL
from analyses.common.level import Level, Record, Variant, register_level
from hooked_vit.errors import InvalidArgumentError

CONFIG_FILE = "config.json"
MEANS_DIR = "means"
RANDOM_KEY = "random_control"
PAPER_TABLE3 = """| Model | Node (%) | Size (%) ↓ | Acc. (%) ↑ | NCQ ↑ |
|---|---:|---:|---:|---:|
| Dense | 29.03 ± 1.97 | 32.42 ± 1.75 | 89.12 ± 6.58 | 0.602 ± 0.046 |
| Wanda 10% | 36.43 ± 1.63 | 34.23 ± 0.98 | 92.32 ± 3.86 | 0.607 ± 0.028 |
| Wanda 30% | 36.42 ± 1.74 | 26.89 ± 0.77 | 92.31 ± 4.44 | 0.675 ± 0.035 |
| Wanda 50% | 37.83 ± 1.75 | 19.90 ± 0.61 | 90.82 ± 5.81 | 0.727 ± 0.047 |
| Wanda 70% | 41.60 ± 2.23 | 12.94 ± 0.58 | 89.64 ± 6.22 | 0.780 ± 0.054 |"""


def k_name(k: float) -> str:
    """The folder of one k: ``k_0.001``."""
    return f"k_{float(k):g}"


def unit_name(k: float, class_id: int) -> str:
    """The unit of class ``class_id`` at ``k``: ``k_0.001/class_3``."""
    return f"{k_name(k)}/class_{class_id}"


def model_ks(config: CircuitConfig, variant: Variant) -> list[float]:
    """The k values of one model: its Table 3 k, then each swept k (Table 7)."""
    return list(dict.fromkeys([resolve_k(config, variant.sparsity), *(float(k) for k in config.sweep_k or ())]))


def check_run_directory(out: Path, config: CircuitConfig, *, write: bool = True) -> None:
    """Check that ``out/config.json``, if present, has the same settings (fields that change
    circuits) as ``config`` -- a differing one is an error naming the fields -- and, with
    ``write``, write it when absent."""
    from analyses.common.results import read_json, write_json

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


def load_random_model(config: CircuitConfig) -> Any:
    """``config.model``'s architecture with random weights (seeded by ``config.seed``): the control."""
    from hooked_vit import HookedViT
    from hooked_vit.data import resolve_device

    return HookedViT.from_pretrained(config.model, pretrained=False, seed=config.seed,
                                     device=resolve_device(config.device))


@register_level("circuit")
class Circuit(Level):
    """Tables 3 and 7: node-mask circuits per class of each model (sec. 3.4, 4.4, A.1, C)."""

    title = "Circuit level"
    paper = "Table 3"
    unit = "the circuit of one class at one k in one model (k_<k>/class_<c>)"
    Config = CircuitConfig
    Result = CircuitResult
    run_only = ("sparsities", "classes", "sweep_k", "random_control", "class_batch", "eval_batch_size", "device", "k")
    open_choices = ("k", "loss", "reference", "steps", "batch_size", "lr", "schedule", "tau", "n_means_images")
    figures = {"metrics.png": "circuit node and edge fractions, accuracy and NCQ vs sparsity",
               "heatmap.png": "circuit membership per site and block"}
    paper_numbers = PAPER_TABLE3

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._resolved: dict[str, list[int]] = {}

    # -- the models: the family's variants, and the random-weight control
    def variants(self, config: CircuitConfig) -> list[Variant]:
        variants = super().variants(config)
        if config.random_control:
            variants.append(Variant(RANDOM_KEY, 0.0, RANDOM_LABEL))
        return variants

    def load(self, config: CircuitConfig, variant: Variant) -> Any:
        if variant.key == RANDOM_KEY and self.model_loader is None:
            return load_random_model(config)
        return super().load(config, variant)

    # -- the units
    def classes(self, config: CircuitConfig) -> list[int]:
        """The class indices analysed: ``config.classes`` as given when they are indices (checked
        against the images in :meth:`prepare`), else resolved on the val split (every class
        present when ``None``)."""
        given = config.classes
        if given is not None and all(isinstance(c, int) and not isinstance(c, bool) for c in given):
            return list(dict.fromkeys(given))
        key = repr((config.model, config.data, config.train_split, config.val_split, given))
        if key not in self._resolved:
            from analyses.common.classes import resolve_classes

            classes = resolve_classes(self.dataset(config, config.val_split), given)
            resolve_classes(self.dataset(config, config.train_split), classes)
            self._resolved[key] = classes
        return self._resolved[key]

    def units(self, config: CircuitConfig) -> list[str]:
        """The units of the dense model (see :meth:`variant_units`)."""
        return self.variant_units(config, self.variants(config)[0])

    def variant_units(self, config: CircuitConfig, variant: Variant) -> list[str]:
        """One unit per k of the model (:func:`model_ks`) and class."""
        classes = self.classes(config)
        return [unit_name(k, c) for k in model_ks(config, variant) for c in classes]

    # -- one model
    def prepare(self, config: CircuitConfig, model: Any, variant: Variant, out: Path) -> dict[str, Any]:
        """The model's train/val images (classes checked), the directory claimed for ``config``,
        and the classes of each k this process computes (the batches)."""
        from analyses.common.classes import resolve_classes

        out = Path(out)
        check_run_directory(out, config, write=False)
        train = self.dataset(config, config.train_split, model)
        val = self.dataset(config, config.val_split, model)
        classes = resolve_classes(val, config.classes)
        resolve_classes(train, classes)
        if classes != self.classes(config):
            raise InvalidArgumentError(f"classes {config.classes!r} resolve to {classes} on these images, "
                                       f"not {self.classes(config)}")
        check_run_directory(out, config)  # the inputs are valid: claim the directory
        ks = model_ks(config, variant)
        names = {unit_name(k, c): (k, c) for k in ks for c in classes}
        pending = {k: [c for c in classes if unit_name(k, c) in self.pending] for k in ks}
        return {"config": config, "variant": variant, "out": out, "train": train, "val": val,
                "names": names, "pending": pending, "means": None, "means_path": None, "done": {}}

    def compute(self, unit: str, model: Any, data: dict[str, Any]) -> dict[str, Any]:
        """The unit's row of :class:`CircuitResult` (trained with the rest of its class batch, whose
        rows wait in ``data``); the circuit is also saved beside the unit's JSON."""
        if unit in data["done"]:
            return data["done"].pop(unit)
        config, variant = data["config"], data["variant"]
        k, c = data["names"][unit]
        from analyses.circuit.discovery import discover_circuits, prepare_means

        pending = data["pending"][k]
        step = config.class_batch or max(len(pending), 1)
        chunk = pending[pending.index(c) // step * step:][:step] if c in pending else [c]
        if data["means"] is None and config.reference != "zero":
            data["means"], data["means_path"] = prepare_means(model, data["train"], config,
                                                              means_directory=data["out"] / MEANS_DIR,
                                                              show_progress=self.show_progress)
        found = discover_circuits(model, data["train"], chunk, config, val=data["val"], means=data["means"], k=k,
                                  sparsity=variant.sparsity, show_progress=self.show_progress,
                                  desc=f"{variant.label}, k={k:g}, classes {chunk[0]}..{chunk[-1]}")
        for circuit in found:
            circuit.means_path = data["means_path"]
            circuit.save(data["out"] / variant.key / k_name(k) / f"class_{circuit.class_id}")
            data["done"][unit_name(k, circuit.class_id)] = {
                "model": variant.label, "sparsity": variant.sparsity, "k": circuit.k, "class": circuit.class_id,
                "class_name": circuit.class_name, **circuit.metrics}
        return data["done"].pop(unit)

    def combine(self, config: CircuitConfig, records: list[Record]) -> CircuitResult:
        """Rows per model (in the models' order), per k (its Table 3 k, then the swept ones), per class."""
        rows: list[dict[str, Any]] = []
        keys: dict[str, str] = {}
        for variant in self.variants(config):
            mine = [r for r in records if r.variant == variant]
            for k in model_ks(config, variant):
                rows += [r.record for r in mine if r.record["k"] == k]
            if mine:
                keys[variant.label] = mine[0].settings["model_key"]
        return CircuitResult(config, rows, keys, sum(r.seconds for r in records))

    # -- the report
    def describe_choice(self, config: CircuitConfig, path: str) -> str | None:
        """How the report shows setting ``path`` where the plain value says too little: ``k=None``
        spelt out as the model's presets."""
        if path == "k" and config.k is None:
            return f"model preset: dense `{resolve_k(config, 0.0):g}`, sparse `{resolve_k(config, 0.5):g}`"
        return None


__all__ = ["Circuit", "check_run_directory", "k_name", "load_random_model", "model_ks", "unit_name"]
