"""``hooked-vit circuits``: node-mask circuits of a dense model and its pruned variants (IMPACT
Table 3; Table 7 with ``--sweep-k``).

Only the standard library and :mod:`hooked_vit.cli_args` are imported at module level, so ``--help``
answers at once; every option is checked by its argparse type while parsing (a bad value ends the
run with one line and exit code 2), before any model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.common.defaults import DEFAULT_MODEL, DEFAULT_SPARSITIES
from hooked_vit.cli_args import (
    add_device_argument,
    add_model_family_arguments,
    class_list,
    non_negative_float,
    non_negative_int,
    number_list,
    output_dir,
    parse_classes,
    parse_numbers,
    positive_float,
    positive_int,
)

LOSSES = ("bce_margin", "ce_true_label")
SCHEDULES = ("step", "linear")
REFERENCES = ("mean", "pooled_mean", "zero")
# The quick setting (README "Circuit level"): 3 classes, 100 steps of 16 + 16 images, the learning rate
# scaled by 600 / 100 so that the logits can travel as far as in the full protocol.
QUICK = {"classes": "0,3,7", "steps": 100, "batch_size": 16, "lr": 6e-2}
FULL = {"classes": None, "steps": 600, "batch_size": 32, "lr": 1e-2}
k_list = number_list("--sweep-k", check=lambda v: v >= 0, valid="each k must be a number >= 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit circuits`` options."""
    add_model_family_arguments(parser, DEFAULT_MODEL, DEFAULT_SPARSITIES)
    parser.add_argument("--train-split", default="train", help="split the masks are trained on (default train)")
    parser.add_argument("--val-split", default="val", help="split the metrics are measured on (default val)")
    parser.add_argument("--classes", default=None, type=class_list,
                        help="comma-separated class indices, ids or names (default all)")
    parser.add_argument("--k", default=None, type=non_negative_float,
                        help="sparsity coefficient k of eq. 10 (default: the model's preset; 1e-3 for the embedded "
                             "model, 8e-5 dense / 4e-5 sparse for deit3_base)")
    parser.add_argument("--sweep-k", default=None, type=k_list,
                        help="comma-separated k values for the Table 7 sensitivity study")
    parser.add_argument("--steps", default=None, type=positive_int, help="optimisation steps per circuit (default 600)")
    parser.add_argument("--batch-size", default=None, type=positive_int,
                        help="images of the class per step, and as many of the other classes (default 32)")
    parser.add_argument("--lr", default=None, type=positive_float,
                        help="AdamW learning rate of the mask logits (default 1e-2)")
    parser.add_argument("--schedule", default="step", choices=SCHEDULES,
                        help="learning-rate schedule (default step: x0.2 at 1/3 and 2/3)")
    parser.add_argument("--loss", default="bce_margin", choices=LOSSES, help="task loss (default bce_margin)")
    parser.add_argument("--reference", default="mean", choices=REFERENCES,
                        help="replacement of left-out nodes (default mean, per position)")
    parser.add_argument("--tau", default=1.0, type=positive_float,
                        help="temperature of the sigmoid surrogate gradient (default 1)")
    parser.add_argument("--n-means-images", default=None, type=positive_int,
                        help="means over this many train images (default all)")
    parser.add_argument("--n-eval", default=None, type=positive_int,
                        help="val images of the class per circuit (default all), and as many of the others")
    parser.add_argument("--freeze-ln", action="store_true", help="hold LayerNorm scales at their clean values")
    parser.add_argument("--random-control", action="store_true", help="also run a random-weight model (control)")
    parser.add_argument("--quick", action="store_true",
                        help="quick setting: classes 0,3,7, 100 steps of 16+16 images, lr 6e-2 (options given "
                             "explicitly still win)")
    parser.add_argument("--seed", default=0, type=non_negative_int,
                        help="seed of mask initialisation and batches (default 0)")
    parser.add_argument("--class-batch", default=None, type=positive_int,
                        help="classes trained together in one batch (default all)")
    parser.add_argument("--eval-batch-size", default=None, type=positive_int,
                        help="images per evaluation batch (default 256)")
    add_device_argument(parser, None, "torch device (default CUDA if available, else CPU)")
    parser.add_argument("--out", default=None, type=output_dir,
                        help="output folder (default runs/circuits-<model>[-quick])")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_options(args: argparse.Namespace) -> tuple[dict, Path]:
    """The :class:`CircuitConfig` keyword arguments of options already checked by their argparse
    types (lists parsed, the ``--quick`` preset filled in), and the output folder."""
    preset = QUICK if args.quick else FULL
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    options = dict(
        model=args.model, dataset=args.data, train_split=args.train_split, val_split=args.val_split,
        sparsities=parse_numbers(args.sparsities, "--sparsities"), method=args.method,
        finetune_epochs=args.finetune_epochs, n_calib=args.n_calib, calib_sampling=args.calib_sampling, classes=parse_classes(pick("classes")), k=args.k,
        sweep_k=None if args.sweep_k is None else parse_numbers(args.sweep_k, "--sweep-k"),
        steps=pick("steps"), batch_size=pick("batch_size"), lr=pick("lr"), schedule=args.schedule, loss=args.loss,
        reference=args.reference, tau=args.tau, n_means_images=args.n_means_images, n_eval=args.n_eval,
        freeze_ln=args.freeze_ln, random_control=args.random_control, seed=args.seed, class_batch=args.class_batch,
        eval_batch_size=args.eval_batch_size, device=args.device,
    )
    out = Path(args.out) if args.out else Path("runs") / f"circuits-{args.model}{'-quick' if args.quick else ''}"
    return options, out


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit circuits``: check the options, run, print Table 3 (and 7)."""
    options, out = parse_options(args)
    from analyses.circuits.config import CircuitConfig
    from analyses.circuits.runner import run_circuits

    config = CircuitConfig(**options)
    result = run_circuits(config, out, show_progress=not args.no_progress)
    print(result.markdown())
    if config.sweep_k:
        print("\nTable 7 (k sweep):\n" + result.markdown(result.table7()))
    written = "table3.csv/.md, " + ("table7.csv/.md, " if config.sweep_k else "")
    print(f"\n{result.seconds:.0f} s; wrote {out}/{written}per_class.csv, metrics.png, heatmap.png, result.json and "
          f"one circuit per class under {out}/sparsity_*/k_*/class_*/")
    return 0
