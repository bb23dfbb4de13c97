"""Settings of the layer level (IMPACT sec. 3.3 / 4.3, Table 2, Figure 3; Tables 5/6): the model
family, the SAE and how sae-lens trains it (:class:`SAETrainConfig`, the options ``--sae.<field>``),
the latent metrics and the optional SAE sweep (standard library only: ``hooked-vit layer --help``
builds its options from these fields without importing torch or sae-lens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from analyses.common.family import ModelFamily, check_choice, check_positive, setting
from analyses.common.vocabulary import NEGATIVE_RULES
from hooked_vit.errors import InvalidArgumentError
from hooked_vit.names import TOKEN_CHOICES, check_tokens

LR_SCHEDULERS: tuple[str, ...] = ("constant", "cosineannealing", "cosineannealingwarmrestarts")
NORMALIZATIONS: tuple[str, ...] = ("none", "expected_average_only_in")
# SAETrainConfig fields that do not change what is learned (may differ when resuming).
OPERATIONAL_FIELDS = frozenset({"n_checkpoints", "keep_checkpoints", "log_every", "image_batch_size",
                                "memory_limit_bytes", "cache_dir"})
# BatchTopK's reference (bartbussmann/BatchTopK) counts a latent dead after 5 batches of 4,096
# activations without firing.
DEAD_AFTER_BATCHES, REFERENCE_BATCH = 5, 4096


def dead_window_steps(train_batch_size: int, training_samples: int) -> int:
    """sae-lens's ``dead_feature_window`` (a latent is dead after MORE than that many steps without
    firing) matching BatchTopK's reference: dead after ``5 * 4096`` activations without firing, i.e.
    ``ceil(20480 / train_batch_size) - 1`` steps; at most a tenth of the run's steps (so latents can
    be counted dead, and revived, during a short run), at least 1."""
    reference = max(1, math.ceil(DEAD_AFTER_BATCHES * REFERENCE_BATCH / train_batch_size) - 1)
    return max(1, min(reference, (training_samples // train_batch_size) // 10))


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class SAETrainConfig:
    """A BatchTopK SAE and how sae-lens trains it. Defaults are the paper's probe (sec. 4.3):
    CLS token of the last block's residual stream, ``k=128``, expansion factor 32.

    ``hook_name``: default ``blocks.{n_layers-1}.hook_resid_post`` (``hook_pooled``, the pooled
    readout, for a model without a class token). ``tokens``: ``cls``,
    ``patch`` or ``all``. ``k``: mean active latents per activation (BatchTopK keeps the
    ``k * batch`` largest over a batch). ``d_sae = expansion_factor * d_in``.
    ``training_samples``: activations seen in training (steps = ``training_samples //
    train_batch_size``). ``lr`` (Adam, sae-lens's clip at grad norm 1), ``lr_scheduler`` one of
    ``constant``, ``cosineannealing``, ``cosineannealingwarmrestarts``, with ``lr_warm_up_steps``
    / ``lr_decay_steps`` / ``lr_end``. ``aux_loss_coefficient``: weight of the auxiliary loss that
    revives dead latents (1/32 as in the BatchTopK paper); a latent counts as dead for it after
    more than ``dead_feature_window`` steps without firing (default: :func:`dead_window_steps`,
    BatchTopK's rule of 5 batches of 4,096 activations, scaled to ``train_batch_size`` and capped
    at a tenth of the run, so the auxiliary loss can act). ``topk_threshold_lr``: EMA rate of the
    threshold used at inference. ``normalize_activations``: ``none`` or
    ``expected_average_only_in`` (scale inputs to norm ``sqrt(d_in)``, folded in at the end).
    Store: ``buffer_size``, ``image_batch_size``, ``memory_limit_bytes``, ``cache_dir`` (see
    :class:`~analyses.layer.activation_store.ActivationStoreConfig`). ``n_checkpoints`` evenly spaced
    checkpoints (kept: the last ``keep_checkpoints``). ``seed`` seeds the SAE init and the stream.
    The device and the progress bars are the run's (:func:`analyses.layer.sae.train_sae` arguments).
    """

    hook_name: str | None = setting(None, "hook the SAE reads (default blocks.{n_layers-1}.hook_resid_post; "
                                      "hook_pooled for a model without a class token)")
    tokens: str = setting("cls", "tokens the SAE reads: CLS only, patch tokens, or both", choices=TOKEN_CHOICES)
    k: float | int = setting(128, "BatchTopK k: mean active latents per activation")
    expansion_factor: int = setting(32, "dictionary size d_sae = expansion_factor * d_in")
    training_samples: int = setting(2**22, "activations seen in training")
    train_batch_size: int = setting(4096, "activations per training step")
    lr: float | int = setting(3e-4, "Adam learning rate")
    lr_scheduler: str = setting("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warm_up_steps: int = setting(0, "learning-rate warm-up steps")
    lr_decay_steps: int = setting(0, "learning-rate decay steps")
    lr_end: float | int | None = setting(None, "final learning rate of the schedule (default: lr)")
    aux_loss_coefficient: float | int = setting(1 / 32, "weight of the dead-latent auxiliary loss")
    topk_threshold_lr: float | int = setting(0.01, "EMA rate of the inference threshold")
    dead_feature_window: int | None = setting(None, "steps without firing before a latent counts as dead in "
                                              "training (default: BatchTopK's 5 x 4096 activations in steps of "
                                              "train_batch_size, at most a tenth of the run)")
    feature_sampling_window: int = setting(2000, "steps between sae-lens's feature-sparsity logs")
    decoder_init_norm: float | int | None = setting(0.1, "initial norm of the decoder rows")
    rescale_acts_by_decoder_norm: bool = setting(True, "rank latents by activation x decoder norm")
    normalize_activations: str = setting("none", "input normalization", choices=NORMALIZATIONS)
    n_batches_for_norm_estimate: int = setting(100, "batches that estimate the input norm (with normalization)")
    buffer_size: int = setting(2**16, "activations in the shuffling buffer")
    image_batch_size: int | None = setting(None, "images per forward pass of the activation store "
                                           "(default 64 CPU / 256 GPU)")
    memory_limit_bytes: int = setting(2 * 2**30, "keep one epoch's activations in memory when they fit")
    cache_dir: str | None = setting(None, "on-disk activation cache (per model: <dir>/sparsity_<s>/<sae>)")
    n_checkpoints: int = setting(0, "training checkpoints per SAE (a killed run resumes from the last)")
    keep_checkpoints: int = setting(2, "checkpoints kept (the latest)")
    log_every: int = setting(100, "steps between logged training metrics")
    seed: int = setting(0, "SAE init and activation stream seed")

    def __post_init__(self) -> None:
        check_tokens(self.tokens)
        check_positive(self, "expansion_factor", "training_samples", "train_batch_size", "buffer_size",
                       "n_batches_for_norm_estimate", allow_none=False)
        check_positive(self, "image_batch_size")
        if self.dead_feature_window is None and self.train_batch_size >= 1:
            self.dead_feature_window = dead_window_steps(self.train_batch_size, self.training_samples)
        if not _number(self.k) or not self.k > 0:
            raise InvalidArgumentError(f"k must be positive, got {self.k}")
        if self.training_samples < self.train_batch_size:
            raise InvalidArgumentError(f"training_samples ({self.training_samples}) must be at least one batch "
                                       f"(train_batch_size {self.train_batch_size} >= 1)")
        for name in ("lr", "topk_threshold_lr"):
            if not _number(getattr(self, name)) or not getattr(self, name) > 0:
                raise InvalidArgumentError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        if not _number(self.aux_loss_coefficient) or self.aux_loss_coefficient < 0:
            raise InvalidArgumentError(f"aux_loss_coefficient must be a number >= 0, got {self.aux_loss_coefficient!r}")
        check_choice(self, "lr_scheduler", LR_SCHEDULERS)
        check_choice(self, "normalize_activations", NORMALIZATIONS)
        for name in ("log_every", "dead_feature_window", "feature_sampling_window", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cache_dir is not None and not str(self.cache_dir).strip():
            raise InvalidArgumentError("cache_dir must be a folder path (or None: no cache), got ''")
        for name in ("n_checkpoints", "lr_warm_up_steps", "lr_decay_steps"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def training_steps(self) -> int:
        return self.training_samples // self.train_batch_size

    def resolved_hook(self, model: Any) -> str:
        """``hook_name``, or the paper's default for ``model``."""
        from analyses.layer.activation_store import default_hook_name

        return self.hook_name if self.hook_name is not None else default_hook_name(model)

    def store_config(self, model: Any, *, device: str | None = None, progress: bool = True) -> Any:
        """The training stream's :class:`~analyses.layer.activation_store.ActivationStoreConfig`
        (shuffled, seeded with ``seed``), delivering to ``device`` (default: the model's)."""
        from analyses.layer.activation_store import ActivationStoreConfig

        return ActivationStoreConfig(
            hook_names=(self.resolved_hook(model),), tokens=self.tokens, train_batch_size=self.train_batch_size,
            buffer_size=max(self.buffer_size, self.train_batch_size), shuffle=True, seed=self.seed,
            image_batch_size=self.image_batch_size, memory_limit_bytes=self.memory_limit_bytes,
            cache_dir=self.cache_dir, device=device, progress=progress,
        )

    def sae_config(self, d_in: int, device: str) -> Any:
        """sae-lens's BatchTopK training config for activations of width ``d_in``."""
        from analyses.layer.sae import BatchTopKTrainingSAEConfig

        d_sae = self.expansion_factor * d_in
        if self.k > d_sae:
            raise InvalidArgumentError(f"k={self.k} exceeds the dictionary size d_sae={d_sae} ({self.expansion_factor} x {d_in})")
        return BatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=self.k, topk_threshold_lr=self.topk_threshold_lr,
            aux_loss_coefficient=self.aux_loss_coefficient, decoder_init_norm=self.decoder_init_norm,
            rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm,
            normalize_activations=self.normalize_activations, device=device,
        )

    def trainer_config(self, device: str, checkpoint_path: Any | None) -> Any:
        """sae-lens's trainer config: no wandb, checkpoints under ``checkpoint_path`` if given."""
        from analyses.layer.sae import LoggingConfig, SAETrainerConfig

        return SAETrainerConfig(
            total_training_samples=self.training_steps * self.train_batch_size,
            train_batch_size_samples=self.train_batch_size,
            lr=self.lr, lr_end=self.lr if self.lr_end is None else self.lr_end,
            lr_scheduler_name=self.lr_scheduler, lr_warm_up_steps=self.lr_warm_up_steps,
            lr_decay_steps=self.lr_decay_steps, device=device,
            dead_feature_window=self.dead_feature_window, feature_sampling_window=self.feature_sampling_window,
            n_checkpoints=self.n_checkpoints if checkpoint_path is not None else 0,
            checkpoint_path=str(checkpoint_path) if checkpoint_path is not None else None,
            save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False),
            n_batches_for_norm_estimate=self.n_batches_for_norm_estimate,
        )

    def identity(self) -> dict[str, Any]:
        """The fields that determine what is learned (compared when resuming)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in OPERATIONAL_FIELDS}


def sae_label(cfg: SAETrainConfig) -> str:
    """Directory name of an SAE: ``<hook or default>-<tokens>-k<k>-x<expansion>``."""
    hook = cfg.hook_name or "last_resid_post"
    return f"{hook}-{cfg.tokens}-k{cfg.k:g}-x{cfg.expansion_factor}"


def _as_train_config(value: Any) -> SAETrainConfig:
    return SAETrainConfig(**value) if isinstance(value, dict) else value


@dataclass
class LayerConfig(ModelFamily):
    """Settings of a layer-level run.

    ``model`` pruned with ``method`` (Wanda calibrated on ``n_calib`` train images of ``data``
    drawn by ``calib_sampling``, then ``finetune_epochs`` of masked fine-tuning on that train split;
    ``None``: the model preset's protocol) at each of ``sparsities`` (0 = dense). SAEs train on
    ``train_split`` and are evaluated on ``split``. ``sae``: the SAE and its training (hook, tokens,
    k, expansion factor, ...), identical for every model as in the paper. ``classes`` (default all
    present), ``top_k`` latents per class, ``negatives`` (rule of :mod:`analyses.common.metrics`);
    ``quality_only``: Table 2 without the latent metrics. ``sweep_k``, ``sweep_expansion_factor``,
    ``sweep_tokens``: the SAE sweep of Tables 5/6 (one factor at a time around ``sae``; empty: no
    sweep). ``batch_size``: images per forward pass; ``device``: default CUDA when available.
    """

    train_split: str = setting("train", "split the SAEs train on")
    split: str = setting("val", "held-out split of the quality and latent metrics")
    sae: SAETrainConfig | dict[str, Any] = setting(factory=SAETrainConfig, help="the SAE and its training")
    classes: tuple[int | str, ...] | None = setting(None, "class indices, ids or names (default all present)")
    top_k: int = setting(50, "latents per class (at most d_sae)")
    negatives: str = setting("clamp", "how negative activations enter the metrics", choices=NEGATIVE_RULES)
    quality_only: bool = setting(False, "only Table 2 (no latent metrics)")
    sweep_k: tuple[float | int, ...] = setting((), "also train and evaluate SAEs with these k (Tables 5/6)")
    sweep_expansion_factor: tuple[int, ...] = setting((), "also train and evaluate SAEs with these expansion "
                                                      "factors (Tables 5/6)")
    sweep_tokens: tuple[str, ...] = setting((), "also train and evaluate SAEs on these tokens (Tables 5/6)",
                                            choices=TOKEN_CHOICES)
    batch_size: int | None = setting(None, "images per forward pass (default 64 CPU / 256 GPU)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sae = _as_train_config(self.sae)
        if not isinstance(self.sae, SAETrainConfig):
            raise InvalidArgumentError(f"sae must be an SAETrainConfig or a dict of its fields, got "
                                       f"{type(self.sae).__name__}")
        if self.classes is not None:
            self.classes = tuple(self.classes)
        check_positive(self, "top_k", allow_none=False)
        check_positive(self, "batch_size")
        check_choice(self, "negatives", NEGATIVE_RULES)
        self.sweep_k = tuple(self.sweep_k)
        self.sweep_expansion_factor = tuple(self.sweep_expansion_factor)
        self.sweep_tokens = tuple(self.sweep_tokens)
        for k in self.sweep_k:
            if not _number(k) or not k > 0:
                raise InvalidArgumentError(f"sweep_k: each k must be > 0, got {k!r}")
        for e in self.sweep_expansion_factor:
            if isinstance(e, bool) or not isinstance(e, int) or e < 1:
                raise InvalidArgumentError(f"sweep_expansion_factor: each expansion factor must be a whole number "
                                           f">= 1, got {e!r}")
        for t in self.sweep_tokens:
            check_tokens(t)

    @property
    def sweeps(self) -> bool:
        """Whether the run includes the SAE sweep (Tables 5/6)."""
        return bool(self.sweep_k or self.sweep_expansion_factor or self.sweep_tokens)


# What the study's presets set (``[level.layer]``): the embedded 96-wide model's SAE (k = d_in/6, as the
# paper's 128/768; expansion 2), and what that reduces (nothing: the paper's probe is for DeiT-III B/16).
EMBEDDED_SAE = {"k": 16, "expansion_factor": 2, "training_samples": 150_000, "train_batch_size": 256, "lr": 1e-3,
                "normalize_activations": "expected_average_only_in"}
PRESETS: dict[str, dict] = {"quick": {"sae": EMBEDDED_SAE, "top_k": 10}, "full": {"sae": EMBEDDED_SAE, "top_k": 10}}
REDUCED: dict[str, str] = {}

CONFIG = LayerConfig

__all__ = ["CONFIG", "LR_SCHEDULERS", "LayerConfig", "NORMALIZATIONS", "OPERATIONAL_FIELDS", "SAETrainConfig",
           "TOKEN_CHOICES", "check_tokens", "dead_window_steps", "sae_label"]
