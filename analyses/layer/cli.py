"""The ``hooked-vit sae-train`` and ``sae-eval`` options (standard library only, so ``--help`` and
bad options answer without importing torch or sae-lens). Every option, the ``--sweep-*`` lists
included, is checked while parsing, before any training starts.

The defaults repeat :class:`analyses.layer.sae.SAETrainConfig`'s and the constants those of
:mod:`analyses.layer.level` / :mod:`analyses.layer.activation_store` (tests/test_bad_inputs.py checks they agree).
"""

from __future__ import annotations

import argparse

from analyses.common.defaults import DEFAULT_MODEL, DEFAULT_SPARSITIES
from hooked_vit.cli_args import (
    add_device_argument,
    add_model_family_arguments,
    any_int,
    class_list,
    name_list,
    non_negative_float,
    non_negative_int,
    number_list,
    output_dir,
    positive_float,
    positive_int,
)

TOKEN_CHOICES: tuple[str, ...] = ("cls", "patch", "all")
LR_SCHEDULERS: tuple[str, ...] = ("constant", "cosineannealing", "cosineannealingwarmrestarts")
NORMALIZATIONS: tuple[str, ...] = ("none", "expected_average_only_in")
NEGATIVE_RULES: tuple[str, ...] = ("clamp", "shift")
# SAETrainConfig() defaults: the paper's probe.
SAE_DEFAULTS = {"tokens": "cls", "k": 128, "expansion_factor": 32, "training_samples": 2**22,
                "train_batch_size": 4096, "lr": 3e-4, "lr_scheduler": "constant", "aux_loss_coefficient": 1 / 32,
                "dead_feature_window": None, "topk_threshold_lr": 0.01, "normalize_activations": "none",
                "buffer_size": 2**16, "log_every": 100}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit sae-train`` options (defaults: the paper's probe)."""
    d = SAE_DEFAULTS
    add_model_family_arguments(parser, DEFAULT_MODEL, DEFAULT_SPARSITIES)
    parser.add_argument("--train-split", default="train", help="split the SAEs train on (default train)")
    parser.add_argument("--split", default="val", help="held-out split for quality (default val)")
    parser.add_argument("--hook", default=None, help="hook name (default blocks.{n_layers-1}.hook_resid_post)")
    parser.add_argument("--tokens", default=d["tokens"], choices=TOKEN_CHOICES, help="tokens (default cls)")
    parser.add_argument("--k", type=positive_float, default=d["k"],
                        help=f"BatchTopK k, mean active latents (default {d['k']:g})")
    parser.add_argument("--expansion", type=positive_int, default=d["expansion_factor"],
                        help=f"expansion factor, d_sae = expansion * d_in (default {d['expansion_factor']})")
    parser.add_argument("--samples", type=positive_int, default=d["training_samples"],
                        help=f"training activations (default {d['training_samples']})")
    parser.add_argument("--train-batch-size", type=positive_int, default=d["train_batch_size"],
                        help=f"activations per training step (default {d['train_batch_size']})")
    parser.add_argument("--lr", type=positive_float, default=d["lr"], help=f"Adam learning rate (default {d['lr']:g})")
    parser.add_argument("--lr-scheduler", default=d["lr_scheduler"], choices=LR_SCHEDULERS)
    parser.add_argument("--lr-warm-up-steps", type=non_negative_int, default=0)
    parser.add_argument("--lr-decay-steps", type=non_negative_int, default=0)
    parser.add_argument("--aux-coefficient", type=non_negative_float, default=d["aux_loss_coefficient"],
                        help="weight of the dead-latent auxiliary loss (default 1/32)")
    parser.add_argument("--dead-window", type=positive_int, default=d["dead_feature_window"],
                        help="steps without firing before a latent counts as dead in training (default: BatchTopK's "
                             "5 x 4096 activations in steps of --train-batch-size, at most a tenth of the run)")
    parser.add_argument("--threshold-lr", type=positive_float, default=d["topk_threshold_lr"],
                        help="EMA rate of the inference threshold (default 0.01)")
    parser.add_argument("--normalize", default=d["normalize_activations"], choices=NORMALIZATIONS)
    parser.add_argument("--buffer-size", type=positive_int, default=d["buffer_size"],
                        help="activations in the shuffling buffer")
    parser.add_argument("--cache-dir", default=None, type=output_dir,
                        help="on-disk activation cache (per model: <dir>/sparsity_<s>)")
    parser.add_argument("--checkpoints", type=non_negative_int, default=4, help="training checkpoints per SAE (default 4)")
    parser.add_argument("--log-every", type=positive_int, default=d["log_every"], help="steps between logged metrics")
    parser.add_argument("--seed", type=any_int, default=0, help="SAE init and activation stream seed")
    parser.add_argument("--sweep-k", default=None,
                        type=number_list("--sweep-k", check=lambda v: v > 0, valid="each k must be > 0"),
                        help="also sweep k (comma-separated), as Tables 5/6")
    parser.add_argument("--sweep-expansion", default=None,
                        type=number_list("--sweep-expansion", int, check=lambda v: v >= 1,
                                     valid="each expansion factor must be >= 1"),
                        help="also sweep expansion factors (comma-separated)")
    parser.add_argument("--sweep-tokens", default=None, type=name_list("token choice", TOKEN_CHOICES),
                        help="also sweep token choices (comma-separated)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per forward pass (default 64 CPU / 256 GPU)")
    add_device_argument(parser, None, "torch device (default CUDA if available, else CPU)")
    parser.add_argument("--out", default=None, type=output_dir,
                        help="output folder (default runs/layer-level-<model>)")
    parser.add_argument("--no-resume", action="store_true", help="retrain from scratch instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (sae-lens's included)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit sae-eval`` options."""
    parser.add_argument("--out", default=None, type=output_dir,
                        help=f"folder written by sae-train (default runs/layer-level-{DEFAULT_MODEL})")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="latents per class (default: the run's, 50; at most d_sae)")
    parser.add_argument("--classes", default=None, type=class_list,
                        help="comma-separated class indices, ids or names (default all)")
    parser.add_argument("--negatives", default="clamp", choices=NEGATIVE_RULES)
    parser.add_argument("--quality-only", action="store_true", help="only Table 2 (no latent metrics)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per forward pass")
    add_device_argument(parser, None, "torch device (default: as trained)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
