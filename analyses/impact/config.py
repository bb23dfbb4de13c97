"""What a study runs: :class:`StudyConfig` (the model family, the levels, and each level's own
settings), its presets (``quick``, ``full``, ``paper``), TOML files, and the resolved config every
level receives.

The model family (``model``, ``data``, ``methods``, ``sparsities`` and the variant protocol) is
set once and shared by every level, so the levels always analyse the same variants. A level's own
settings (``[level.<name>]`` in TOML) are keyword arguments of its config class
(:func:`analyses.common.level.config_class`). A preset fills in what the config leaves out.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyses.common.family import DEFAULT_MODEL, DEFAULT_SPARSITIES, setting
from analyses.common.level import STUDY_LEVELS, config_class, level_names, level_presets
from hooked_vit.cli_args import PRUNING_METHODS
from hooked_vit.errors import InvalidArgumentError, MissingFileError
from hooked_vit.protocol import SAMPLINGS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Settings that change how a study runs, not its numbers: a rerun into the same folder may differ in them.
RUN_ONLY: tuple[str, ...] = ("levels", "device", "preset")
LEVEL_RUN_ONLY: tuple[str, ...] = ("batch_size", "eval_batch_size", "class_batch", "device")
# The study's part of each preset; each level adds its own settings (its config module's PRESETS,
# :func:`~analyses.common.level.level_presets`). "full" adds nothing to the levels' defaults, the full
# protocol, but the embedded model's SAE.
PRESETS: dict[str, dict[str, Any]] = {"quick": {"model": DEFAULT_MODEL}, "full": {"model": DEFAULT_MODEL},
                                      "paper": {"model": "deit3_base"}}


def reductions(preset_name: str | None, levels: tuple[str, ...]) -> dict[str, str]:
    """Per level of ``levels``, what preset ``preset_name`` reduces from its full protocol (for the report)."""
    found = {name: level_presets(name)[1].get(preset_name or "") for name in levels}
    return {name: text for name, text in found.items() if text}


@dataclass
class StudyConfig:
    """A whole study.

    ``model`` (alias or saved folder) and its variants: each of ``methods`` at each of
    ``sparsities`` (0 = dense), Wanda calibrated on ``n_calib`` images drawn by ``calib_sampling``
    from the train split of ``data`` (``"builtin"`` or an ImageNet-style folder), then
    ``finetune_epochs`` of masked fine-tuning (``None``: the model preset's protocol). ``levels``:
    which levels to run (:func:`~analyses.common.level.level_names`; default the built-in ones). ``level``: per level name, settings of its config class
    (e.g. ``{"circuit": {"steps": 100}}``). ``preset``: the preset these came from (recorded).
    ``device``: default CUDA when available (under torchrun, each process's local GPU).
    """

    model: str = setting(DEFAULT_MODEL, "model alias or saved model folder (default: the preset's)")
    data: str = setting("builtin", "'builtin' (the model's own dataset) or an ImageNet-style folder root")
    methods: tuple[str, ...] = setting(("wanda",), "pruning methods", choices=PRUNING_METHODS)
    sparsities: tuple[float | int, ...] = setting(DEFAULT_SPARSITIES, "fractions in [0, 1), 0 (dense) included")
    finetune_epochs: int | None = setting(None, "masked fine-tuning epochs of each variant (default: the model "
                                          "preset's, 2)")
    n_calib: int | None = setting(None, "Wanda calibration images (default: the preset's)")
    calib_sampling: str | None = setting(None, "calibration sampling (default: the preset's)", choices=SAMPLINGS)
    classifier: str = setting("model", "class logits for a headless model: 'model', 'probe', 'probe:N' or "
                              "'zero-shot:PATH' (see docs/headless.md)", metavar="model|probe[:N]|zero-shot:PATH")
    levels: tuple[str, ...] = setting(STUDY_LEVELS, "levels to run (default the paper's; any built-in or registered level)")
    level: dict[str, dict[str, Any]] = setting(help="per level, settings of its config ([level.<name>] in TOML)",
                                               factory=dict)
    preset: str | None = setting(None, "quick: the embedded model, reduced where a level's full run takes long "
                                 "(minutes on a CPU); full: the embedded model, every level's full protocol; paper: "
                                 "deit3_base with the paper's settings (needs --data, an ImageNet folder). Default: "
                                 "quick, or the config file's", choices=("quick", "full", "paper"))
    device: str | None = setting(None, "torch device (default CUDA if available, else CPU; under torchrun each "
                                 "process's own GPU)")

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.sparsities = tuple(self.sparsities)
        self.levels = tuple(self.levels)
        if not self.methods:
            raise InvalidArgumentError("methods must name at least one pruning method (e.g. wanda)")
        unknown = [name for name in (*self.levels, *self.level) if name not in level_names()]
        if unknown or not self.levels:
            raise InvalidArgumentError(f"unknown level(s) {unknown or list(self.levels)}; choose from "
                                       f"{', '.join(level_names())}")
        if self.preset is not None and self.preset not in PRESETS:
            raise InvalidArgumentError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.preset == "paper" and self.data == "builtin":
            raise InvalidArgumentError("the paper preset analyses ImageNet-1K: give --data, an ImageNet-style folder "
                                       "(root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG)")
        if 0 not in [float(s) for s in self.sparsities]:
            raise InvalidArgumentError(f"sparsities must include 0 (the dense model every table compares with), "
                                       f"got {list(self.sparsities)}")
        for name in self.compared_levels():  # every setting checked now, before any work starts
            for method in self.methods:
                self.level_config(name, method)

    def compared_levels(self) -> tuple[str, ...]:
        """The levels whose settings a study records: the paper's (so a rerun that adds one compares
        it too) and any other level it runs."""
        return tuple(dict.fromkeys([*STUDY_LEVELS, *self.levels]))

    def level_config(self, name: str, method: str) -> Any:
        """The config of level ``name`` for the variants pruned with ``method``."""
        options = dict(self.level.get(name, {}))
        family = {"model": self.model, "data": self.data, "sparsities": self.sparsities, "method": method,
                  "finetune_epochs": self.finetune_epochs, "n_calib": self.n_calib,
                  "calib_sampling": self.calib_sampling, "classifier": self.classifier, "device": self.device}
        clash = sorted(set(options) & set(family))
        if clash:
            raise InvalidArgumentError(f"level {name!r} sets {', '.join(clash)}, which the study sets for every level; "
                                       "set them at the top of the config")
        cls = config_class(name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidArgumentError(f"level {name!r} has no setting(s) {', '.join(unknown)}; its settings: "
                                       f"{', '.join(sorted(known - set(family)))}")
        from analyses.common.results import config_from_dict

        return config_from_dict(cls, {**family, **options})

    def identity(self) -> dict[str, Any]:
        """Everything the study's numbers depend on: the fields but the run-only ones, each level's
        resolved config (defaults filled in) without its run-only settings."""
        from analyses.common.results import config_to_dict

        data = {k: v for k, v in config_to_dict(self).items() if k not in (*RUN_ONLY, "level")}
        for name in self.compared_levels():
            for method in self.methods:
                resolved = config_to_dict(self.level_config(name, method))
                data[f"level.{name}.{method}"] = {k: v for k, v in resolved.items() if k not in LEVEL_RUN_ONLY}
        return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def preset(name: str, **overrides: Any) -> StudyConfig:
    """Preset ``name`` (:data:`PRESETS`) with ``overrides`` (fields of :class:`StudyConfig`;
    ``level`` is merged per level and setting)."""
    if name not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    from analyses.common.results import config_from_dict

    levels = {level: settings[name] for level in level_names() if name in (settings := level_presets(level)[0])}
    return config_from_dict(StudyConfig, _merge({**PRESETS[name], "level": levels, "preset": name}, overrides))


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The table in TOML file ``path`` (one-line errors for a missing or malformed file)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist; write one (see the README, 'The whole study') "
                               "or use --preset")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(f"{path} is not valid TOML: {error}") from None


def load_config(path: str | os.PathLike, **overrides: Any) -> StudyConfig:
    """A :class:`StudyConfig` from a TOML file (its ``preset``, default ``quick``, fills in the rest),
    then ``overrides``."""
    data = read_toml(path)
    if "preset" in overrides:
        data["preset"] = overrides.pop("preset")
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgumentError(f"{path}: unknown setting(s) {', '.join(unknown)}; the settings are "
                                   f"{', '.join(sorted(known))}")
    return preset(data.pop("preset", None) or "quick", **_merge(data, overrides))


def to_toml(config: StudyConfig) -> str:
    """``config`` as TOML (``None`` settings are left out: they mean "the default")."""
    import tomli_w

    from analyses.common.results import config_to_dict

    def drop_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        return value

    return tomli_w.dumps(drop_none(config_to_dict(config)))


def differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: A there, B now"`` for each setting that differs (nested settings by dotted path)."""
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return lines
