"""Layer level (IMPACT sec. 3.3 and 4.3, Table 2, Figure 3; appendix B, Tables 5 and 6): a BatchTopK
SAE per model (dense and pruned) on one hook, its reconstruction quality and the four neuron-level
metrics applied to its latents, plus the optional SAE sweep.

Units of one model variant (``<out>/<variant>/<unit>.json``):

* ``sae``: the model's SAE trained by sae-lens (:func:`analyses.layer.sae.train_sae`) on the
  ``train_split`` images into ``<out>/<variant>/<sae_label>/`` (sae-lens format; a killed training
  resumes from its latest checkpoint, a finished one is loaded), then loaded from there and
  evaluated on the ``split`` images (:func:`analyses.layer.latents.evaluate_layer`: Table 2's
  quality and, unless ``quality_only``, the latent metrics of Figure 3). Training and evaluation
  are one unit: units are dealt round-robin to the processes of a ``torchrun``, so as two units
  every evaluation could land on another process than the training it needs.
* ``sweep/<sae_label>``, with ``sweep_*`` set: one more SAE setting of Tables 5/6 trained (into its
  own folder beside the main one) and its held-out quality measured
  (:func:`analyses.layer.sae_quality.sweep_row`). The sweep's base setting is the main SAE: its
  row is the ``sae`` unit's quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analyses.common.level import Level, Record, Variant, register_level
from analyses.layer.config import OPERATIONAL_FIELDS, LayerConfig, SAETrainConfig, sae_label
from analyses.layer.result import LayerResult
from hooked_vit.errors import InvalidArgumentError

SAE_UNIT = "sae"
SWEEP_UNIT = "sweep"


def sweep_settings(config: LayerConfig) -> list[SAETrainConfig]:
    """The SAE settings of the sweep (Tables 5/6), the base (``config.sae``) first; none without a sweep."""
    if not config.sweeps:
        return []
    from analyses.layer.sae_quality import SweepConfig

    return SweepConfig(base=config.sae, ks=config.sweep_k, expansion_factors=config.sweep_expansion_factor,
                       tokens=config.sweep_tokens).settings()


def sae_dir(out: str | Path, variant: Variant, sae: SAETrainConfig) -> Path:
    """``<out>/<variant>/<sae_label>``: where the SAE of one model and SAE setting is saved (the main
    SAE and the sweep's share the layout)."""
    return Path(out) / variant.key / sae_label(sae)


def model_sae_config(sae: SAETrainConfig, variant: Variant) -> SAETrainConfig:
    """``sae`` with its activation cache, if any, in a folder per model and SAE setting."""
    if sae.cache_dir is None:
        return sae
    import dataclasses

    return dataclasses.replace(sae, cache_dir=str(Path(sae.cache_dir) / variant.key / sae_label(sae)))


@register_level("layer")
class Layer(Level):
    """Table 2 and Figure 3: per model one ``sae`` unit (train, then evaluate); Tables 5/6: one
    ``sweep/<sae_label>`` unit per further SAE setting."""

    title = "Layer level"
    paper = "Table 2, Figure 3"
    unit = "model (its SAE trained, checkpointed and evaluated; with a sweep, one more per SAE setting)"
    Config = LayerConfig
    Result = LayerResult
    run_only = ("sparsities", "batch_size", "device", "sweep_k", "sweep_expansion_factor", "sweep_tokens")
    open_choices = ("sae.hook_name", "sae.tokens", "sae.k", "sae.expansion_factor", "sae.training_samples",
                    "sae.normalize_activations", "sae.dead_feature_window", "top_k", "negatives")
    figures = {"figure.png": "Figure 3: SAE latent metrics vs sparsity"}
    paper_numbers = """| Sparsity | NMSE ↓ | Dead ↓ | Expl. Var. (%) ↑ |
|---|---:|---:|---:|
| Dense (0%) | 0.0075 | 85.93 | 99.25 |
| 10% | 0.0404 | 74.97 | 95.96 |
| 30% | 0.0396 | 75.18 | 96.04 |
| 50% | 0.0461 | 72.96 | 95.39 |
| 70% | 0.0594 | 68.31 | 94.06 |"""

    def units(self, config: LayerConfig) -> list[str]:
        return [SAE_UNIT] + [f"{SWEEP_UNIT}/{sae_label(s)}" for s in sweep_settings(config)[1:]]

    def settings(self, config: LayerConfig, model: Any, variant: Variant) -> dict[str, Any]:
        """The level's settings, the SAE's without its operational fields (checkpoints, cache, log
        interval, store batch and memory: they do not change what is learned)."""
        settings = super().settings(config, model, variant)
        settings["sae"] = {k: v for k, v in settings["sae"].items() if k not in OPERATIONAL_FIELDS}
        return settings

    def prepare(self, config: LayerConfig, model: Any, variant: Variant, out: Path) -> dict[str, Any]:
        """Checks the SAE settings against the model's hook (before any training), loads the train
        and held-out splits."""
        from analyses.common.classes import resolve_classes
        from analyses.layer.activation_store import check_token_choice, hook_layout

        sweep = sweep_settings(config)
        layout = hook_layout(model, config.sae.resolved_hook(model))
        d_in = layout.d_in
        for setting in [config.sae, *sweep]:
            check_token_choice(model, layout, setting.tokens)
            d_sae = setting.expansion_factor * d_in
            if setting.k > d_sae:
                raise InvalidArgumentError(f"k={setting.k} exceeds the dictionary size d_sae={d_sae} "
                                           f"({setting.expansion_factor} x {d_in})")
        if not config.quality_only and config.top_k > config.sae.expansion_factor * d_in:
            raise InvalidArgumentError(f"top_k={config.top_k} exceeds the SAE's {config.sae.expansion_factor * d_in} "
                                       "latents")
        train = self.dataset(config, config.train_split, model)
        held_out = self.dataset(config, config.split, model)
        if not config.quality_only:
            resolve_classes(held_out, config.classes)
        return {"config": config, "variant": variant, "out": Path(out), "train": train, "held_out": held_out,
                "sweep": {sae_label(s): s for s in sweep}}

    def compute(self, unit: str, model: Any, data: dict[str, Any]) -> dict[str, Any]:
        config, variant = data["config"], data["variant"]
        if unit == SAE_UNIT:
            return self._train_and_evaluate(config, model, variant, data)
        setting = data["sweep"][unit.removeprefix(f"{SWEEP_UNIT}/")]
        from analyses.layer.sae import train_sae
        from analyses.layer.sae_quality import sweep_row

        run = train_sae(model, data["train"], model_sae_config(setting, variant),
                        out_dir=sae_dir(data["out"], variant, setting), device=config.device,
                        progress=self.show_progress)
        return {"model": variant.label, **sweep_row(model, run, data["held_out"], config.batch_size,
                                                    progress=self.show_progress)}

    def _train_and_evaluate(self, config: LayerConfig, model: Any, variant: Variant,
                            data: dict[str, Any]) -> dict[str, Any]:
        """Train (or resume, or load) the model's SAE into :func:`sae_dir`, then evaluate the SAE
        saved there on the held-out split."""
        from analyses.common.ablation import model_key
        from analyses.layer.latents import evaluate_layer
        from analyses.layer.sae import TRAIN_CONFIG_FILE, TRAINING_FILE, load_sae, train_sae
        from hooked_vit.reading import read_json

        directory = sae_dir(data["out"], variant, config.sae)
        key = model_key(model)
        if (directory / TRAIN_CONFIG_FILE).is_file():  # an SAE of other weights there: refused before any work
            trained_on = read_json(directory / TRAIN_CONFIG_FILE, "an SAE run's configuration (JSON)",
                                   "delete the SAE's folder to train it again").get("model_key")
            if trained_on is not None and trained_on != key:
                raise InvalidArgumentError(f"the SAE in {directory} was trained on other weights ({trained_on}) "
                                           f"than {config.model} at sparsity {variant.sparsity:g} ({key}); retrain "
                                           "it (delete the folder) or use another output folder")
        run = train_sae(model, data["train"], model_sae_config(config.sae, variant), out_dir=directory,
                        device=config.device, progress=self.show_progress)
        loaded = run.training_sae is None
        del run
        training = read_json(directory / TRAINING_FILE, "an SAE's training summary (JSON)",
                             "delete the SAE's folder to train it again")
        sae = load_sae(directory)
        trained_on = sae.cfg.metadata.model_key
        if trained_on is not None and trained_on != key:
            raise InvalidArgumentError(f"the SAE in {directory} was trained on other weights ({trained_on}) than "
                                       f"{config.model} at sparsity {variant.sparsity:g} ({key}); retrain it")
        sae.to(device=next(model.parameters()).device)
        evaluation = evaluate_layer(model, sae, data["held_out"], config, sparsity=variant.sparsity,
                                    features=not config.quality_only, show_progress=self.show_progress)
        return {"sae_dir": f"{variant.key}/{directory.name}", "loaded": loaded, "training": training, **evaluation}

    def combine(self, config: LayerConfig, records: list[Record]) -> LayerResult:
        result = LayerResult(config, seconds=sum(r.seconds for r in records))
        for r in records:
            if r.unit != SAE_UNIT:
                result.sweep.append(r.record)
                continue
            result.quality += r.record["quality"]
            result.rows += r.record["rows"]
            result.latents += r.record["latents"]
            result.model_keys[f"{r.variant.sparsity:g}"] = r.settings["model_key"]
            if config.sweeps:  # the sweep's base setting is the main SAE
                q = r.record["quality"][0]
                result.sweep.append({
                    "model": r.variant.label, "tokens": q["tokens"], "k": q["k"], "expansion": q["expansion"],
                    "fve": q["explained_variance"], "nmse": q["nmse"], "dead_latents": q["dead_latents"],
                    "dead_fraction": q["dead_fraction"], "l0": q["l0"], "d_sae": q["d_sae"],
                    "n_tokens": q["n_tokens"],
                    "train_seconds": round(float(r.record["training"].get("seconds_this_call", 0.0)), 1)})
        return result


__all__ = ["SAE_UNIT", "SWEEP_UNIT", "Layer", "model_sae_config", "sae_dir", "sweep_settings"]
