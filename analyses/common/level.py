"""The one shape of every analysis, and the one driver that runs them.

A level is a :class:`Level` subclass registered under its name (:func:`register_level`)::

    @register_level("toy")
    class Toy(Level):
        Config = ToyConfig      # a dataclass extending ModelFamily; its fields are the CLI options and TOML keys
        Result = ToyResult      # an AnalysisResult: save/load, markdown(), its figures
        def units(self, config): ...                 # the units of work of one model variant (names)
        def compute(self, unit, model, data): ...    # one unit's record (JSON-able), saved by the driver
        def combine(self, config, records): ...      # the Result, from the saved records alone

:func:`run_level` is the driver: for each model variant (:meth:`Level.variants`, by default one per
sparsity) it loads the model once per process, skips the units already saved with the same
settings, builds the per-model ``data`` (:meth:`Level.prepare`) only if a unit is left, computes and
saves each unit as soon as it is done (``<out>/<variant>/<unit>.json``, atomically), takes only its
share of the units under ``torchrun`` (:class:`~analyses.common.units.Shard`), and, once every unit is
saved, combines them without loading a model, saves the result and writes ``done.json``.

The built-in levels live in ``analyses/<name>/`` and are imported when used; the command line
imports only their config module (:data:`BUILTIN`), so ``--help`` never imports torch.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from analyses.common.results import config_to_dict, read_json, settings_without, write_json
from analyses.common.units import Shard, load_unit, read_unit, save_unit
from hooked_vit.errors import InvalidArgumentError, MissingFileError

DONE_FILE = "done.json"
# Built-in levels: name -> (module defining the Level, light module defining its Config).
BUILTIN: dict[str, tuple[str, str]] = {
    "accuracy": ("analyses.accuracy", "analyses.accuracy.config"),
    "neuron": ("analyses.neuron", "analyses.neuron.config"),
    "layer": ("analyses.layer", "analyses.layer.config"),
    "circuit": ("analyses.circuit", "analyses.circuit.config"),
    "model": ("analyses.model", "analyses.model.config"),
    "transcoders": ("analyses.transcoders", "analyses.transcoders.config"),
    "mis": ("analyses.mis", "analyses.mis.config"),
    "replacement": ("analyses.replacement", "analyses.replacement.config"),
}
# The paper's levels: what ``hooked-vit impact`` runs by default and every study records.
STUDY_LEVELS: tuple[str, ...] = ("accuracy", "neuron", "layer", "circuit", "model")
LEVELS: dict[str, type[Level]] = {}


@dataclass(frozen=True)
class Variant:
    """One model a level analyses: its folder name under the level's output (``key``), the
    ``sparsity`` it is pruned to, and its ``label`` in tables."""

    key: str
    sparsity: float
    label: str


@dataclass(frozen=True)
class Record:
    """One saved unit: the variant and unit it belongs to, its record, the settings it was computed
    with (including the weights' ``model_key``) and the seconds it took."""

    variant: Variant
    unit: str
    record: Any
    settings: dict[str, Any]
    seconds: float


class Level:
    """Base of every level (see the module docstring). Class attributes: ``name`` (set by
    :func:`register_level`), ``title``, ``paper`` (the tables/figures it reproduces), ``unit`` (what
    one unit of work is), ``Config``, ``Result``, ``run_only`` (config fields a unit's numbers do not
    depend on, so a resumed run may change them), ``open_choices`` (settings the paper leaves open,
    as dotted paths into the config, for the report), ``figures`` (file -> caption) and
    ``paper_numbers`` (the paper's own table, markdown, shown beside ours in the paper's setting)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    unit: ClassVar[str] = "model"
    Config: ClassVar[type]
    Result: ClassVar[type]
    run_only: ClassVar[tuple[str, ...]] = ("sparsities", "device")
    open_choices: ClassVar[tuple[str, ...]] = ()
    figures: ClassVar[dict[str, str]] = {}
    paper_numbers: ClassVar[str | None] = None
    # prepare is a collective step under torchrun (it trains data-parallel): every process runs it for
    # a variant with any unit left, its own units or not
    collective_prepare: ClassVar[bool] = False
    # the level reads class logits: a headless model needs a --classifier (else it is analysed as it is)
    needs_logits: ClassVar[bool] = True

    def __init__(self, *, show_progress: bool = True, model_loader: Callable[[Any, Variant], Any] | None = None,
                 datasets: Mapping[str, Any] | None = None):
        """``model_loader(config, variant)`` replaces :meth:`load` and ``datasets`` (split name ->
        :class:`~hooked_vit.data.LabelledImages`) replace :meth:`dataset`'s loading (tests, notebooks)."""
        self.show_progress = show_progress
        self.model_loader = model_loader
        self.datasets = dict(datasets or {})
        self.pending: tuple[str, ...] = ()  # set by the driver before prepare: this process's units left to compute

    # -- what a level defines
    def units(self, config: Any) -> list[str]:
        """The units of work of one model variant, as names usable in a path (``"classes/3"``)."""
        return ["model"]

    def prepare(self, config: Any, model: Any, variant: Variant, out: Path) -> Any:
        """Per-model state every unit of ``variant`` needs (built only when one is left to compute;
        :attr:`pending` then names this process's units of ``variant`` left to compute, in order,
        for a level that computes several in one go)."""
        return None

    def compute(self, unit: str, model: Any, data: Any) -> Any:
        """One unit's record (JSON-able)."""
        raise NotImplementedError(f"level {self.name!r} does not define compute")

    def combine(self, config: Any, records: list[Record]) -> Any:
        """The level's result from every saved record (no model is loaded)."""
        raise NotImplementedError(f"level {self.name!r} does not define combine")

    # -- what a level may refine
    def variant_units(self, config: Any, variant: Variant) -> list[str]:
        """The units of ``variant`` (default :meth:`units`, the same for every model)."""
        return self.units(config)

    def variants(self, config: Any) -> list[Variant]:
        """The models analysed: the dense model and each pruned variant of ``config.sparsities``."""
        from analyses.common.labels import model_label

        return [Variant(f"sparsity_{float(s):g}", float(s), model_label(s, config.method)) for s in config.sparsities]

    def load(self, config: Any, variant: Variant) -> Any:
        """The model of ``variant`` (built or loaded from the variant cache)."""
        if self.model_loader is not None:
            return self.model_loader(config, variant)
        from analyses.common.variants import load_model

        return load_model(config, variant.sparsity, needs_logits=self.needs_logits)

    def dataset(self, config: Any, split: str, model: Any = None) -> Any:
        """Split ``split`` of ``config.data`` (or the dataset given for it), transformed for ``model``.
        Without a model (for labels and counts before any model is loaded), ``"builtin"`` is the
        builtin dataset named by ``config.model``'s preset or saved folder."""
        if split in self.datasets:
            return self.datasets[split]
        from hooked_vit.data import load_dataset

        source = builtin_source(config.model) if model is None and str(config.data) == "builtin" else config.data
        return load_dataset(source, split=split, model=model)

    def describe_choice(self, config: Any, path: str) -> str | None:
        """How the report shows open choice ``path`` when its value needs explaining (``None``: as is)."""
        return None

    def settings(self, config: Any, model: Any, variant: Variant) -> dict[str, Any]:
        """What a unit's record depends on besides its name: the config without :attr:`run_only`,
        and the weights (``model_key``). A saved unit with other settings is recomputed."""
        from analyses.common.ablation import model_key

        return {**settings_without(config, self.run_only), "model_key": model_key(model), "variant": variant.key}


def builtin_source(model: str) -> str:
    """The builtin dataset a model alias's preset (or a saved model folder's ``config.json``) names,
    read without loading the model."""
    import json

    from hooked_vit.data import BUILTIN_DATASETS, DEFAULT_BUILTIN
    from hooked_vit.pretrained import get_spec, resolve_model_name

    directory, alias = resolve_model_name(model)
    if alias is not None:
        name = get_spec(alias).dataset
    else:
        saved = Path(directory) / "config.json"  # written by HookedViT.save_pretrained
        name = json.loads(saved.read_text()).get("dataset") if saved.is_file() else None
    name = name or DEFAULT_BUILTIN
    if name not in BUILTIN_DATASETS:
        raise InvalidArgumentError(f"data='builtin' means the model's builtin dataset, but {model} was trained on "
                                   f"{name!r}, which is not builtin ({', '.join(BUILTIN_DATASETS)}); pass the root "
                                   "of its image folder as data")
    return name


def register_level(name: str) -> Callable[[type[Level]], type[Level]]:
    """Register the decorated :class:`Level` subclass as level ``name`` (its folder, subcommand,
    ``--levels`` entry and config section)."""

    def decorate(cls: type[Level]) -> type[Level]:
        if not name.isidentifier():
            raise InvalidArgumentError(f"a level name must be an identifier, got {name!r}")
        cls.name = name
        LEVELS[name] = cls
        return cls

    return decorate


def level_names() -> tuple[str, ...]:
    """Every level: the built-in ones, then those registered since."""
    return tuple(dict.fromkeys([*BUILTIN, *LEVELS]))


def get_level(name: str) -> type[Level]:
    """The :class:`Level` class registered as ``name`` (a built-in one is imported now)."""
    if name not in LEVELS and name in BUILTIN:
        importlib.import_module(BUILTIN[name][0])
    if name not in LEVELS:
        raise InvalidArgumentError(f"unknown level {name!r}; choose from {', '.join(level_names())}")
    return LEVELS[name]


def config_class(name: str) -> type:
    """Level ``name``'s config dataclass, importing only its light config module for built-in levels."""
    if name in LEVELS:
        return LEVELS[name].Config
    if name in BUILTIN:
        module = importlib.import_module(BUILTIN[name][1])
        return module.CONFIG
    raise InvalidArgumentError(f"unknown level {name!r}; choose from {', '.join(level_names())}")


def level_presets(name: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Level ``name``'s settings per study preset (``{"quick": {"steps": 100}}``) and, per preset, what
    they reduce from the level's full protocol (text for the report): the ``PRESETS`` and ``REDUCED``
    of the module defining its config (empty where it has none)."""
    module = importlib.import_module(config_class(name).__module__)
    return dict(getattr(module, "PRESETS", {})), dict(getattr(module, "REDUCED", {}))


# ------------------------------------------------------------------------------------------ driver
def unit_path(out: Path, variant: Variant, unit: str) -> Path:
    """Where one unit's record is saved."""
    return out / variant.key / f"{unit}.json"


def _plan(level: Level, config: Any) -> list[tuple[Variant, str]]:
    plan = []
    for variant in level.variants(config):
        units = level.variant_units(config, variant)
        if len(set(units)) != len(units):
            raise InvalidArgumentError(f"level {level.name!r} names a unit of {variant.key} twice: {units}")
        plan += [(variant, unit) for unit in units]
    return plan


def _by_variant(plan: Iterable[tuple[Variant, str]]) -> dict[Variant, list[str]]:
    grouped: dict[Variant, list[str]] = {}
    for variant, unit in plan:
        grouped.setdefault(variant, []).append(unit)
    return grouped


def compute_units(level: Level, config: Any, out: str | os.PathLike, shard: Shard = Shard()) -> None:
    """This process's share of the level's units: each variant's model loaded once, saved units with
    the same settings kept, the others computed and saved one by one. A level with
    ``collective_prepare`` loads every variant and prepares it on every process while any of its
    units (this process's or another's) is left, so a data-parallel prepare meets all processes."""
    from hooked_vit.data import progress

    out = Path(out)
    plan = _plan(level, config)
    taken = shard.take(plan)
    mine = set(taken)
    collective = level.collective_prepare and not shard.whole
    for variant, units in _by_variant(plan if collective else taken).items():
        model = level.load(config, variant)
        settings = level.settings(config, model, variant)
        left = [u for u in units
                if load_unit(unit_path(out, variant, u), settings, f"a {level.name}-level unit (JSON)") is None]
        pending = [u for u in left if (variant, u) in mine]
        if pending or (collective and left):  # a collective prepare: every process while any unit is left
            level.pending = tuple(pending)
            data = level.prepare(config, model, variant, out)
            for unit in progress(pending, desc=f"{level.name}: {variant.label}", total=len(pending),
                                 enabled=level.show_progress and len(pending) > 1):
                start = time.perf_counter()
                record = level.compute(unit, model, data)
                save_unit(unit_path(out, variant, unit), settings, record, seconds=time.perf_counter() - start)
            del data
        del model


def combine_units(level: Level, config: Any, out: str | os.PathLike) -> Any:
    """The level's result from the records saved under ``out`` (every unit must be there), saved to ``out``."""
    out = Path(out)
    records = []
    for variant, unit in _plan(level, config):
        path = unit_path(out, variant, unit)
        saved = read_unit(path, f"a {level.name}-level unit (JSON)")
        if saved is None:
            raise MissingFileError(f"{path} is missing: run the {level.name} level first (hooked-vit {level.name})")
        records.append(Record(variant, unit, saved["record"], saved["settings"], float(saved.get("seconds", 0.0))))
    result = level.combine(config, records)
    result.save(out)
    return result


def run_level(
    level: str | Level,
    config: Any,
    out: str | os.PathLike,
    *,
    shard: Shard = Shard(),
    barrier: Callable[[], None] = lambda: None,
    done_settings: dict[str, Any] | None = None,
) -> Any | None:
    """Run (or resume) ``level`` (a name, or an instance carrying its options) on ``config`` into
    ``out``: this process's units, then, on the first process once ``barrier()`` has seen every share
    saved, the combined result (returned; other processes return ``None``) and ``done.json``. A level
    whose ``done.json`` holds ``done_settings`` (default: the config) is not run again: its result
    is loaded."""
    level = get_level(level)() if isinstance(level, str) else level
    if not isinstance(config, level.Config):
        raise InvalidArgumentError(f"the {level.name} level needs a {level.Config.__name__}, "
                                   f"got {type(config).__name__}")
    out = Path(out)
    settings = config_to_dict(config) if done_settings is None else done_settings
    done = out / DONE_FILE
    if done.is_file() and read_json(done).get("settings") == settings:
        return level.Result.load(out) if shard.rank == 0 else None
    resumed = out.is_dir()
    start = time.perf_counter()
    compute_units(level, config, out, shard)
    barrier()
    result = None
    if shard.rank == 0:
        result = combine_units(level, config, out)
        write_json(done, {"settings": settings, "seconds": time.perf_counter() - start, "processes": shard.world,
                          "resumed": resumed})
    barrier()
    return result


__all__ = ["BUILTIN", "DONE_FILE", "LEVELS", "STUDY_LEVELS", "Level", "Record", "Variant", "builtin_source", "combine_units", "compute_units",
           "config_class", "get_level", "level_names", "level_presets", "register_level", "run_level", "unit_path"]
