"""Transcoders level (issue 23; Chatzoudis et al. 2026): a cross-layer transcoder (CLT) per model in
place of its MLPs, the per-layer baselines on equal total latents, and each layer's contribution to
the final representation.

Units of one model variant (``<out>/<variant>/<unit>.json``):

* ``train/<kind>`` (``clt``, and the ``baselines``: ``plt`` per-layer transcoders, ``sae`` per-layer
  SAEs on the MLP outputs): the dictionary trained on ``train_split`` into ``<out>/<variant>/<kind>/``
  (checkpointed; a finished one is loaded), then measured on the held-out images: per-layer quality
  and the replacement accuracy and KL. Training and measuring are one unit, so under ``torchrun``
  (units dealt round-robin) no measurement waits for a training on another process.
* ``contributions``: the contribution scores of the CLT (loaded from ``<out>/<variant>/clt/``, or
  trained there identically if that unit has not run on this process), per image and per class, and
  the removal and keep-top-k curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analyses.common.level import Level, Record, Variant, register_level
from analyses.transcoders.config import CLTConfig
from analyses.transcoders.result import CLTResult

TRAIN_UNIT = "train"
CONTRIBUTIONS_UNIT = "contributions"


def dictionary_dir(out: str | Path, variant: Variant, kind: str) -> Path:
    """``<out>/<variant>/<kind>``: where a model's dictionary of ``kind`` trains and is saved."""
    return Path(out) / variant.key / kind


@register_level("transcoders")
class Transcoders(Level):
    """Per model: one ``train/<kind>`` unit per dictionary (trained, then measured), then ``contributions``."""

    title = "Cross-layer transcoders"
    paper = "Chatzoudis et al. 2026: reconstruction, replacement, contribution scores"
    unit = "dictionary of one model (trained, checkpointed and measured), then the CLT's contributions"
    Config = CLTConfig
    Result = CLTResult
    run_only = ("sparsities", "device", "batch_size", "checkpoint_every", "baselines")  # a unit is one dictionary
    open_choices = ("activation", "k", "expansion_factor", "skip", "steps", "train_batch_size", "sparsity_penalty",
                    "aux_k_coefficient", "baselines", "ablation")
    figures = {"contributions.png": "Mean contribution score per class and source layer; removal and keep-top-k "
                                    "curves"}
    paper_numbers = """| Measure | Paper (CLIP ViT-B/32 and B/16, zero-shot) |
|---|---|
| per-layer cosine similarity (post-MLP) | 0.92-0.97 |
| per-layer R2 | 0.89-0.95 |
| CLS replaced at every layer; patches in later layers | zero-shot accuracy kept (sometimes improved) |
| removing the top-scored layer's term | up to -5.6 points |
| keeping the top 4 of 12 layers | near the baseline accuracy |"""

    def units(self, config: CLTConfig) -> list[str]:
        return [f"{TRAIN_UNIT}/{kind}" for kind in config.kinds] + [CONTRIBUTIONS_UNIT]

    def prepare(self, config: CLTConfig, model: Any, variant: Variant, out: Path) -> dict[str, Any]:
        """The training split and the held-out images (``n_images`` of ``split``) with their labels."""
        train = self.dataset(config, config.train_split, model)
        held_out = self.dataset(config, config.split, model)
        if config.n_images is not None:
            held_out = held_out.subset(range(min(config.n_images, len(held_out))))
        images, labels = held_out.tensors(show_progress=False)
        device = next(model.parameters()).device
        return {"config": config, "variant": variant, "out": Path(out), "train": train,
                "images": images.to(device), "labels": labels.to(device)}

    def _dictionary(self, kind: str, model: Any, data: dict[str, Any]) -> Any:
        from analyses.transcoders.training import train_clt

        config = data["config"]
        # a unit belongs to one process (units are dealt round-robin under torchrun): no data parallelism here
        return train_clt(model, data["train"], config, kind=kind, device=config.device, progress=self.show_progress,
                         out_dir=dictionary_dir(data["out"], data["variant"], kind), distributed=False)

    def compute(self, unit: str, model: Any, data: dict[str, Any]) -> dict[str, Any]:
        from analyses.transcoders.evaluation import (
            contribution_curves,
            layer_quality,
            replacement_rows,
        )
        from analyses.transcoders.training import TRAINING_FILE
        from hooked_vit.reading import read_json

        config, variant = data["config"], data["variant"]
        batch = config.batch_size or 64
        if unit == CONTRIBUTIONS_UNIT:
            clt = self._dictionary("clt", model, data)
            return {"model": variant.label, "sparsity": variant.sparsity,
                    **contribution_curves(model, clt, data["images"], data["labels"], config.ablation, batch)}
        kind = unit.removeprefix(f"{TRAIN_UNIT}/")
        clt = self._dictionary(kind, model, data)
        training = read_json(dictionary_dir(data["out"], variant, kind) / TRAINING_FILE,
                             "a transcoder's training summary (JSON)", "delete the folder to train it again")
        last = training["history"][-1] if training["history"] else {}
        return {"model": variant.label, "sparsity": variant.sparsity, "kind": kind,
                "training": {"seconds": training["seconds"], "steps": training["steps"],
                             "parameters": training["parameters"], "final_train_fvu": last.get("fvu")},
                "quality": layer_quality(model, clt, data["images"], batch),
                "replacement": replacement_rows(model, clt, data["images"], data["labels"], batch)}

    def combine(self, config: CLTConfig, records: list[Record]) -> CLTResult:
        result = CLTResult(config, seconds=sum(r.seconds for r in records))
        for r in records:
            rec = r.record
            result.model_keys[f"{r.variant.sparsity:g}"] = r.settings["model_key"]
            head = {"model": rec["model"], "sparsity": rec["sparsity"]}
            if r.unit == CONTRIBUTIONS_UNIT:
                result.contributions.append({**head, **{k: rec[k] for k in ("mean", "ranking", "replaced_accuracy")}})
                result.per_class += [{**head, **row} for row in rec["per_class"]]
                result.curves += [{**head, **row} for row in rec["curves"]]
                continue
            kind = {"kind": rec["kind"]}
            result.training.append({**head, **kind, **rec["training"]})
            result.quality += [{**head, **kind, **row} for row in rec["quality"]]
            result.replacement += [{**head, **kind, **row} for row in rec["replacement"]]
        return result


__all__ = ["CONTRIBUTIONS_UNIT", "TRAIN_UNIT", "Transcoders", "dictionary_dir"]
