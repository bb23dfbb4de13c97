"""MIS level: the Machine Interpretability Score of every unit of the dense model and each pruned
variant. A unit of work is one unit kind at one block (``<out>/sparsity_<s>/mlp_act/3.json``: the
activations of every image at that site in one pass, the tasks, the scores), the dictionary latents
per block (``rrm/3``: the replacement level's SAE at the block's output, ``clt/3``: the transcoders
level's CLT encoder at the block's ln2 output, both read from their saved files), plus ``sae`` (the
latents of the layer level's SAE, or of a small SAE trained here). Image embeddings of the
similarity backend are computed once per image set and reused by every unit and variant. With
``human_csv`` the sigmoid's temperature is refit once, on the human answers to the first variant's
tasks, and used (and stored) with every score."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

from analyses.common.level import Level, Record, Variant, register_level
from analyses.mis.config import DICTIONARY_KINDS, MISConfig
from analyses.mis.result import MISResult
from hooked_vit.errors import InvalidArgumentError

SAE_UNIT = "sae"
SAE_FOLDER = "sae_model"


def n_blocks(model: str) -> int:
    """The number of blocks of model alias or saved folder ``model``, read without building it."""
    import json

    from hooked_vit.pretrained import get_spec, resolve_model_name

    directory, alias = resolve_model_name(model)
    if alias is None:
        return int(json.loads((Path(directory) / "config.json").read_text())["n_layers"])
    spec = get_spec(alias)
    if "depth" in spec.timm_kwargs:
        return int(spec.timm_kwargs["depth"])
    import timm
    import torch

    with torch.device("meta"):
        return len(timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs).blocks)


def site_hook(model: Any, kind: str, layer: int) -> str:
    """The hook of unit kind ``kind`` (a circuit site's name, ``resid`` or ``heads``) at block ``layer``."""
    if kind == "resid":
        return f"blocks.{layer}.hook_resid_post"
    if kind == "heads":
        return f"blocks.{layer}.attn.hook_z"
    return model.sites[layer, kind].hook_name


def _digest(path: str) -> str:
    """The SHA-256 of file ``path``'s bytes."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@register_level("mis")
class MIS(Level):
    """Per-unit MIS per model variant; the result's tables give mean, median and share above 0.8
    per kind and block, and neurons vs SAE latents at the SAE's block."""

    title = "Machine interpretability score (MIS)"
    paper = "MIS of Zimmermann, Klindt & Brendel (NeurIPS 2024) per sparsity (not in the IMPACT paper)"
    unit = "unit kind at one block (e.g. mlp_act/3, clt/3), and the SAE"
    Config = MISConfig
    Result = MISResult
    run_only = ("sparsities", "device", "batch_size")
    open_choices = ("position", "split", "n_tasks", "n_references", "quantile", "similarity", "temperature")
    needs_logits = False  # units' activations only: a headless model (DINOv2, CLIP's image tower) runs as it is
    figures: ClassVar[dict[str, str]] = {
        "mis_vs_depth.png": "Mean MIS per block and unit kind, one line per model variant"}

    def __init__(self, **options: Any):
        super().__init__(**options)
        from analyses.mis.similarity import EmbeddingCache

        self.embeddings = EmbeddingCache()  # per image set and backend, shared by every variant
        self._images: tuple[tuple, Any] | None = None
        self._fitted: tuple[tuple, float] | None = None  # ((human_csv, its digest), the refit temperature)
        self._fit_tasks: dict[tuple[str, str], tuple[str, Any]] = {}  # (variant, unit) -> the fit's (kind, tasks)

    def units(self, config: MISConfig) -> list[str]:
        layers = config.layers if config.layers is not None else tuple(range(n_blocks(config.model)))
        return [SAE_UNIT if kind == SAE_UNIT else f"{kind}/{layer}" for kind in config.units
                for layer in (layers if kind != SAE_UNIT else (None,))]

    def prepare(self, config: MISConfig, model: Any, variant: Variant, out: Path) -> dict[str, Any]:
        key = (config.data, config.split, tuple(model.cfg.preprocessing.get("input_size", ())))
        if self._images is None or self._images[0] != key:  # the same images for every variant
            images = self.dataset(config, config.split, model).tensors(show_progress=False)[0]
            self._images = (key, images)
        return {"config": config, "variant": variant, "out": Path(out), "images": self._images[1]}

    def _sae(self, config: MISConfig, model: Any, data: dict[str, Any]) -> Any:
        from analyses.common.ablation import model_key
        from analyses.mis import sae as sae_module

        variant = data["variant"]
        if config.sae_from is not None:
            return sae_module.layer_level_sae(config.sae_from, variant.key)
        layer = config.sae_layer if config.sae_layer is not None else model.cfg.n_layers - 1
        hook, tokens = f"blocks.{layer}.hook_resid_post", "cls" if config.position == "cls" else "patch"
        settings = {"hook_name": hook, "tokens": tokens, "expansion_factor": config.sae_expansion_factor,
                    "k": config.sae_k, "steps": config.sae_steps, "batch_size": config.sae_batch_size,
                    "lr": config.sae_lr, "seed": config.seed, "data": config.data, "split": config.split,
                    "model_key": model_key(model)}

        def train() -> Any:
            acts = sae_module.token_activations(model, data["images"], hook, tokens, batch_size=config.batch_size)
            return sae_module.train_small_sae(acts, hook_name=hook, tokens=tokens,
                                              expansion_factor=config.sae_expansion_factor, k=config.sae_k,
                                              steps=config.sae_steps, batch_size=config.sae_batch_size,
                                              lr=config.sae_lr, seed=config.seed)

        return sae_module.cached_small_sae(data["out"] / variant.key / SAE_FOLDER, settings, train)

    def _dictionary(self, config: MISConfig, kind: str, layer: int, variant: Variant) -> Any:
        """Block ``layer``'s encoder of the saved replacement model (``rrm``) or CLT (``clt``)."""
        from analyses.mis.dictionaries import clt_encoder, replacement_sae

        if kind == "rrm":
            return replacement_sae(config.replacement_from, variant.key, layer)
        return clt_encoder(config.clt_from, variant.key, layer)

    def _tasks(self, unit: str, model: Any, data: dict[str, Any]) -> tuple[str, Any]:
        """Unit of work ``unit``'s kind and tasks (its units' activations on every image, one pass)."""
        from analyses.mis.tasks import make_tasks
        from hooked_vit.saes import sae_hook_name

        config: MISConfig = data["config"]
        if unit == SAE_UNIT:
            sae = self._sae(config, model, data)
            hook, kind = sae_hook_name(sae), SAE_UNIT
            width = int(sae.cfg.d_sae)
        elif unit.split("/")[0] in DICTIONARY_KINDS:
            kind, layer = unit.split("/")
            sae = self._dictionary(config, kind, int(layer), data["variant"])
            hook, width = sae.cfg.metadata.hook_name, int(sae.cfg.d_sae)
        else:
            kind, layer = unit.split("/")
            hook, sae = site_hook(model, kind, int(layer)), None
            width = len(model.units(hook, position=config.position))
        indices = range(min(width, config.max_units or width))
        units = model.units(hook, indices=indices, position=config.position, sae=sae)
        return kind, make_tasks(model, units, data["images"], config)

    def _temperature(self, config: MISConfig, model: Any, data: dict[str, Any]) -> tuple[float, str]:
        """The sigmoid's temperature and its source: ``config.temperature``, or the one refit on the
        answers of ``config.human_csv`` to the tasks of the first variant (computed once per CSV)."""
        if config.human_csv is None:
            return float(config.temperature), "default"
        from analyses.mis.score import (
            read_human_answers,
            refit_temperature,
            task_margins,
        )

        key = (config.human_csv, _digest(config.human_csv))
        if self._fitted is None or self._fitted[0] != key:
            first = self.variants(config)[0]
            keep = data["variant"] == first  # the fit's tasks are this variant's: scored next without a second pass
            if not keep:  # the same images for every variant
                model, data = self.load(config, first), {**data, "variant": first}
            known = self.units(config)
            answered = dict.fromkeys(task.rsplit("/", 2)[0] for task in read_human_answers(config.human_csv))
            unknown = [u for u in answered if u not in known]
            if unknown:
                raise InvalidArgumentError(f"{config.human_csv}: task ids name units {unknown[:3]}, not among this "
                                           f"run's {', '.join(known)} (ids look like {known[0]}/task_1/trial_1)")
            margins = {}
            for unit in answered:
                kind, tasks = self._tasks(unit, model, data)
                if keep:
                    self._fit_tasks[first.key, unit] = (kind, tasks)
                vectors = self.embeddings(config.similarity, tasks.images, mean=tasks.mean, std=tasks.std,
                                          batch_size=config.batch_size)
                margin = task_margins(vectors, tasks.draws).reshape(-1).tolist()
                margins.update({f"{unit}/{task}": m for task, m in zip(tasks.task_ids(), margin)})
            self._fitted = (key, refit_temperature(config.human_csv, margins))
        return self._fitted[1], os.fspath(config.human_csv)

    def settings(self, config: MISConfig, model: Any, variant: Variant) -> dict[str, Any]:
        settings = super().settings(config, model, variant)
        if config.human_csv is not None:  # a unit's scores depend on the answers, not on the CSV's name
            settings["human_csv_sha256"] = _digest(config.human_csv)
        return settings

    def compute(self, unit: str, model: Any, data: dict[str, Any]) -> dict[str, Any]:
        """One site's units: their activations, tasks and MIS (per unit and summarised)."""
        import dataclasses

        from analyses.mis.score import machine_interpretability_score

        config: MISConfig = data["config"]
        start = time.perf_counter()
        temperature, source = self._temperature(config, model, data)
        kind, tasks = self._fit_tasks.pop((data["variant"].key, unit), None) or self._tasks(unit, model, data)
        scores = machine_interpretability_score(tasks, config.similarity, temperature=temperature,
                                                embeddings=self.embeddings, batch_size=config.batch_size)
        scores = dataclasses.replace(scores, temperature_source=source)
        if config.export_tasks is not None:  # for a human study on exactly these tasks (ids <unit>/task_<u>/trial_<t>)
            tasks.export(Path(config.export_tasks) / data["variant"].key / unit)
        units = tasks.units
        return {"kind": kind, "layer": units.layer, "hook_name": units.hook_name, "unit_kind": units.kind,
                "position": units.position, "indices": list(units.indices), "mis": scores.mis.tolist(),
                "constant": scores.constant.tolist(), "tied": scores.tied.tolist(), **scores.summary(),
                "seconds": time.perf_counter() - start}

    def combine(self, config: MISConfig, records: list[Record]) -> MISResult:
        rows = [{"model": r.variant.label, "sparsity": r.variant.sparsity, "unit": r.unit, **r.record}
                for r in records]
        return MISResult(config, rows, {f"{r.variant.sparsity:g}": r.settings["model_key"] for r in records},
                         sum(r.seconds for r in records))
