"""Settings of the transcoders level (issue 23; Chatzoudis et al. 2026, "Can Cross-Layer Transcoders
Replace Vision Transformer Activations?"): the model family, the cross-layer transcoder (CLT) and
how it is trained, the per-layer baselines on equal total latents, and what is measured (standard
library only: ``hooked-vit transcoders --help`` builds its options without importing torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from analyses.common.family import ModelFamily, check_choice, check_positive, setting
from hooked_vit.errors import InvalidArgumentError

ACTIVATIONS: tuple[str, ...] = ("topk", "abstopk", "jumprelu")
PENALTIES: tuple[str, ...] = ("tanh", "l0")
# The dictionaries trained: the CLT, per-layer transcoders (same reads and writes, no cross-layer
# decoders) and per-layer SAEs on the MLP outputs, each with d_latent latents per layer.
KINDS: tuple[str, ...] = ("clt", "plt", "sae")
BASELINES: tuple[str, ...] = KINDS[1:]
ABLATIONS: tuple[str, ...] = ("final", "forward")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class CLTConfig(ModelFamily):
    """A cross-layer transcoder on every block of ``model`` and how it is trained and measured.

    Architecture: ``d_latent = expansion_factor * d_model`` latents per layer, each encoder reading
    ``blocks.l.ln2.hook_normalized``, decoders from every layer ``i <= l`` to ``blocks.l.hook_mlp_out``;
    ``activation`` ``topk`` (ReLU then the ``k`` largest per token and layer), ``abstopk`` (the ``k``
    largest in magnitude, signed) or ``jumprelu`` (learned threshold, straight-through gradient of
    bandwidth ``bandwidth``); ``skip``: a linear skip connection per layer.
    Training: ``steps`` Adam steps (``lr``, linear decay to 0 over the last ``lr_decay_fraction``) of
    ``train_batch_size`` tokens, streamed from forwards of ``images_per_forward`` ``train_split``
    images (all layers from one forward); loss = sum over layers of the normalised MSE (FVU of the
    batch) + for JumpReLU ``sparsity_coefficient`` times the ``sparsity_penalty`` (``tanh``:
    ``tanh(tanh_scale * z * |W_dec|)`` summed, or ``l0``), ramped up over the first
    ``sparsity_warmup_fraction`` of the steps; for TopK ``aux_k_coefficient`` times AuxK (the ``aux_k``
    largest dead latents reconstruct the error; dead: no firing for ``dead_steps`` steps).
    ``checkpoint_every`` steps a checkpoint is saved (a killed training resumes from it).
    ``baselines``: ``plt`` (per-layer transcoders, the default) and/or ``sae`` (per-layer SAEs on the MLP
    outputs), same latents per layer and same loop. Measured on ``n_images`` (default all) ``split`` images,
    ``batch_size`` per forward; ``ablation``: how the contribution curves drop a layer's term
    (``final``: from the final representation; ``forward``: its codes in the replaced forward).
    """

    sparsities: tuple[float | int, ...] = setting((0.0,), "fractions in [0, 1) of pruned weights; 0 is the dense "
                                                  "model (default: the dense model only)")
    activation: str = setting("topk", "sparsifier of the latents", choices=ACTIVATIONS)
    k: int = setting(16, "active latents per token and layer (topk, abstopk)")
    expansion_factor: int = setting(8, "latents per layer d_latent = expansion_factor * d_model")
    skip: bool = setting(False, "a linear skip connection per layer (input -> MLP output)")
    steps: int = setting(1500, "training steps")
    train_batch_size: int = setting(1024, "tokens per training step")
    images_per_forward: int = setting(64, "images per model forward of the activation stream")
    lr: float | int = setting(1e-3, "Adam learning rate")
    lr_decay_fraction: float | int = setting(0.2, "final fraction of the steps over which the lr decays linearly to 0")
    sparsity_penalty: str = setting("tanh", "JumpReLU sparsity penalty", choices=PENALTIES)
    sparsity_coefficient: float | int = setting(1e-3, "JumpReLU sparsity penalty weight (after the warm-up)")
    sparsity_warmup_fraction: float | int = setting(0.5, "fraction of the steps over which the penalty ramps up from 0")
    tanh_scale: float | int = setting(4.0, "c in tanh(c * z * |W_dec|)")
    threshold_init: float | int = setting(0.1, "JumpReLU initial threshold")
    bandwidth: float | int = setting(0.1, "JumpReLU straight-through bandwidth")
    aux_k: int | None = setting(None, "AuxK: dead latents that reconstruct the error (default d_model / 2)")
    aux_k_coefficient: float | int = setting(1 / 32, "AuxK loss weight (TopK)")
    dead_steps: int = setting(100, "steps without firing after which a latent counts as dead (AuxK)")
    checkpoint_every: int = setting(250, "steps between training checkpoints")
    seed: int = setting(0, "initialisation and token-stream seed")
    baselines: tuple[str, ...] = setting(("plt",), "per-layer baselines on equal total latents (plt: transcoders, "
                                         "sae: SAEs on the MLP outputs)", choices=BASELINES)
    train_split: str = setting("train", "split the dictionaries train on")
    split: str = setting("val", "held-out split measured")
    n_images: int | None = setting(None, "held-out images measured (default all)")
    ablation: str = setting("final", "how the removal / keep-top-k curves drop a layer's term", choices=ABLATIONS)
    batch_size: int | None = setting(None, "images per forward pass when measuring (default 64)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "activation", ACTIVATIONS)
        check_choice(self, "sparsity_penalty", PENALTIES)
        check_choice(self, "ablation", ABLATIONS)
        check_positive(self, "k", "expansion_factor", "steps", "train_batch_size", "images_per_forward",
                       "dead_steps", "checkpoint_every", allow_none=False)
        check_positive(self, "aux_k", "n_images", "batch_size")
        self.baselines = tuple(self.baselines)
        for name in self.baselines:
            if name not in BASELINES:
                raise InvalidArgumentError(f"baselines must be among {', '.join(BASELINES)}, got {name!r}")
        if self.skip and "sae" in self.baselines:
            raise InvalidArgumentError("sae-lens SAEs have no skip connection: drop the sae baseline or skip")
        for name in ("lr", "tanh_scale", "threshold_init", "bandwidth"):
            if not _number(getattr(self, name)) or not getattr(self, name) > 0:
                raise InvalidArgumentError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        for name in ("sparsity_coefficient", "aux_k_coefficient"):
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                raise InvalidArgumentError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("lr_decay_fraction", "sparsity_warmup_fraction"):
            if not _number(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise InvalidArgumentError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The dictionaries trained: the CLT, then the baselines."""
        return ("clt", *self.baselines)


# The study presets keep the defaults (already sized for the embedded model); ``quick`` trains fewer steps.
PRESETS: dict[str, dict] = {"quick": {"steps": 800}, "full": {}}
REDUCED: dict[str, str] = {"quick": "800 training steps instead of 1,500"}

CONFIG = CLTConfig

__all__ = ["ABLATIONS", "ACTIVATIONS", "BASELINES", "CONFIG", "KINDS", "PENALTIES", "CLTConfig"]
