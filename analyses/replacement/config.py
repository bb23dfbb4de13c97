"""Settings of the replacement level: the residual replacement model of Kim et al. (NeurIPS 2025),
one TopK SAE (sae-lens) on the residual stream after every block but the last, a faithful
replacement forward, attribution graphs and their faithfulness (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass

from analyses.common.family import ModelFamily, check_choice, check_positive, setting
from hooked_vit.errors import InvalidArgumentError

ARCHITECTURES = ("topk", "batchtopk")
SCHEDULES = ("uniform", "reference")
OBJECTIVES = ("logit_minus_mean", "logit")
# The reference's ViT-B/16 schedule (d_model 768, SAEs after blocks 0..10): K and the dictionary
# ratio R (d_sae = R x d_model) per SAE, from the authors' code (load_default_sae_configs).
REFERENCE_K = (4, 32, 64, 96, 96, 128, 128, 160, 160, 160, 128)
REFERENCE_R = (0.25, 0.5, 1, 2, 2, 2, 4, 4, 4, 4, 2)
REFERENCE_WIDTH = 768
REFERENCE_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def reference_schedule(n_saes: int, d_model: int) -> list[tuple[int, float]]:
    """(k, expansion) per SAE following the reference's ViT-B schedule at the same relative depth,
    k scaled by ``d_model / 768`` (at least 1); the ratio R is kept as is."""
    out = []
    for layer in range(n_saes):
        ref = round(layer * (len(REFERENCE_K) - 1) / max(n_saes - 1, 1))
        out.append((max(1, round(REFERENCE_K[ref] * d_model / REFERENCE_WIDTH)), float(REFERENCE_R[ref])))
    return out


@dataclass
class ReplacementConfig(ModelFamily):
    """The model (dense by default), its SAEs (``architecture``, per-layer ``k`` and
    ``expansion_factor`` or the reference's ``schedule``), their training (``steps`` of
    ``batch_images`` images from ``train_split``, every SAE from one model forward per step),
    the medians nodes are ablated to, the attribution ``objective``, the class graphs and the
    faithfulness protocol (``fractions`` of nodes kept per layer, ``faithfulness_images``)."""

    sparsities: tuple[float | int, ...] = setting((0.0,), "fractions in [0, 1) of pruned weights; 0 is the dense "
                                                  "model (default: the dense model only)")
    train_split: str = setting("train", "split the SAEs train on (and the medians come from)")
    split: str = setting("val", "held-out split of the metrics, graphs and faithfulness")
    architecture: str = setting("topk", "SAE activation: TopK per token (the reference) or BatchTopK",
                                choices=ARCHITECTURES)
    schedule: str = setting("uniform", "per-layer k/expansion: the given k and expansion_factor, or the "
                            "reference's ViT-B schedule scaled to the model width", choices=SCHEDULES)
    k: tuple[int, ...] = setting((32,), "active latents per token, one per SAE (one value: every SAE)")
    expansion_factor: tuple[float | int, ...] = setting((8,), "d_sae / d_model, one per SAE (one value: every SAE)")
    steps: int = setting(1500, "training steps (every SAE steps once per step)")
    batch_images: int = setting(32, "images per training step (all their tokens train every SAE)")
    lr: float | int = setting(1e-3, "Adam learning rate (the reference: 2e-4 on ImageNet)")
    lr_decay: float | int = setting(0.2, "fraction of the steps at the end over which the learning rate decays "
                                    "linearly to 0 (0: constant)")
    cls_repeats: int = setting(8, "times each image's CLS token counts in an SAE's batch (1: once, as a patch; one "
                               "CLS per 64 patches is otherwise reconstructed worse)")
    aux_coefficient: float | int = setting(1 / 32, "weight of the AuxK loss of dead latents (the reference's 1/32)")
    dead_steps: int = setting(60, "steps without firing before a latent is dead for AuxK (the reference's 60)")
    checkpoint_every: int = setting(250, "steps between training checkpoints (a killed run resumes from the last)")
    median_images: int = setting(512, "train images the per-token medians are taken over")
    objective: str = setting("logit_minus_mean", "attributed quantity: target logit minus the mean logit (the "
                             "reference's default) or the target logit", choices=OBJECTIVES)
    classes: tuple[int, ...] | None = setting(None, "classes with an attribution graph (default: all)")
    graph_images: int = setting(8, "correctly classified images per class graph")
    node_budget: int = setting(30, "feature nodes kept in a class graph's figure")
    fractions: tuple[float | int, ...] = setting(REFERENCE_FRACTIONS, "fractions of nodes kept per layer on the "
                                           "faithfulness curves (the reference's top-n grid)")
    faithfulness_images: int = setting(100, "correctly classified images of the faithfulness curves")
    spurious_class: int | None = setting(0, "class the marker of the spurious-correlation experiment goes with "
                                         "(none: no such experiment)")
    spurious_rate: float | int = setting(0.95, "share of the class's train images stamped with the marker")
    spurious_poison: float | int = setting(0.1, "share of the other classes' train images stamped with the marker "
                                           "and relabelled as the class")
    marker_patches: int = setting(2, "side of the marker square in patches (top-left corner, the brightest pixel value)")
    spurious_epochs: int = setting(2, "fine-tuning epochs on the biased train split")
    spurious_lr: float | int = setting(1e-3, "fine-tuning learning rate (AdamW, cosine)")
    spurious_steps: int = setting(500, "SAE training steps of the biased model's replacement model")
    marker_share: float | int = setting(0.25, "a graph node is a marker feature if this share of its activation over "
                                        "the probe images' patches lies on the marker (default: 4x the marker's "
                                        "4 of 64 patches)")
    batch_size: int | None = setting(None, "images per evaluation forward (default 64)")
    seed: int = setting(0, "SAE init, data order, random baseline")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "architecture", ARCHITECTURES)
        check_choice(self, "schedule", SCHEDULES)
        check_choice(self, "objective", OBJECTIVES)
        self.k, self.expansion_factor = tuple(self.k), tuple(self.expansion_factor)
        self.fractions = tuple(float(f) for f in self.fractions)
        if self.classes is not None:
            self.classes = tuple(self.classes)
        check_positive(self, "steps", "batch_images", "dead_steps", "checkpoint_every", "median_images",
                       "graph_images", "node_budget", "faithfulness_images", "cls_repeats", "marker_patches",
                       "spurious_epochs", "spurious_steps", allow_none=False)
        check_positive(self, "batch_size")
        if not self.k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.k):
            raise InvalidArgumentError(f"k must hold whole numbers >= 1 (one per SAE, or one for all), got {self.k!r}")
        if not self.expansion_factor or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0
                                            for e in self.expansion_factor):
            raise InvalidArgumentError(f"expansion_factor must hold numbers > 0, got {self.expansion_factor!r}")
        for name in ("lr", "aux_coefficient"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (name == "lr" and value == 0):
                raise InvalidArgumentError(f"{name} must be a number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        for name in ("lr_decay", "spurious_rate", "spurious_poison", "marker_share", "spurious_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= (
                    float("inf") if name == "spurious_lr" else 1) or (name == "spurious_lr" and value == 0):
                raise InvalidArgumentError(f"{name} must be a number in {'(0, inf)' if name == 'spurious_lr' else '[0, 1]'}, "
                                           f"got {value!r}")
        if self.spurious_class is not None and (isinstance(self.spurious_class, bool)
                                                or not isinstance(self.spurious_class, int) or self.spurious_class < 0):
            raise InvalidArgumentError(f"spurious_class must be a class index >= 0 or none, got {self.spurious_class!r}")
        if not self.fractions or any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise InvalidArgumentError(f"fractions must lie in [0, 1], got {self.fractions!r}")

    def layer_settings(self, n_saes: int, d_model: int) -> list[tuple[int, float]]:
        """(k, expansion) of each of the ``n_saes`` SAEs of a ``d_model``-wide model."""
        if self.schedule == "reference":
            return reference_schedule(n_saes, d_model)
        for name in ("k", "expansion_factor"):
            if len(getattr(self, name)) not in (1, n_saes):
                raise InvalidArgumentError(f"{name} holds {len(getattr(self, name))} values; give one, or one per "
                                           f"SAE ({n_saes}: after every block but the last)")
        ks = self.k * n_saes if len(self.k) == 1 else self.k
        es = self.expansion_factor * n_saes if len(self.expansion_factor) == 1 else self.expansion_factor
        return [(int(k), float(e)) for k, e in zip(ks, es)]


# The study presets: the embedded model's defaults as they are (nothing reduced).
PRESETS: dict[str, dict] = {}
REDUCED: dict[str, str] = {}

CONFIG = ReplacementConfig

__all__ = [
    "ARCHITECTURES",
    "CONFIG",
    "OBJECTIVES",
    "REFERENCE_FRACTIONS",
    "SCHEDULES",
    "ReplacementConfig",
    "reference_schedule",
]
