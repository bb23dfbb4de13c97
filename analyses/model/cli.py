"""``hooked-vit attribution``: the model level (Table 4, Figure 4) from the command line.

Standard library only (with :mod:`hooked_vit.cli_args`), so ``--help`` and bad options answer
without importing torch; every option is checked while parsing, before any work starts. The
constants repeat those of :mod:`analyses.model.lrp` and :mod:`analyses.model.faithfulness`
(tests/test_model_level.py checks they agree).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.common.defaults import DEFAULT_MODEL, DEFAULT_SPARSITIES
from hooked_vit.cli_args import (
    add_device_argument,
    add_model_family_arguments,
    any_int,
    class_list,
    name_list,
    non_negative_int,
    output_dir,
    parse_classes,
    parse_numbers,
    positive_int,
)

DEFAULT_METHODS = "chefer,rollout,random"
METHOD_CHOICES = ("chefer", "attnlrp", "cp_lrp", "rollout", "gradxinput", "random")  # = tuple(lrp.METHODS)
REFERENCE_CHOICES = ("zero", "black", "blur", "mean")  # = faithfulness.REFERENCES
LAYERSCALE_CHOICES = ("identity", "eq14")  # = lrp.LAYERSCALE_RULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit attribution`` options."""
    add_model_family_arguments(parser, DEFAULT_MODEL, DEFAULT_SPARSITIES)
    parser.add_argument("--split", default="val", help="split analysed (default val)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, type=name_list("attribution method", METHOD_CHOICES),
                        help=f"comma-separated attribution methods from {','.join(METHOD_CHOICES)} "
                             f"(default {DEFAULT_METHODS})")
    parser.add_argument("--n-images", type=positive_int, default=None,
                        help="analyse this many images, drawn class-balanced with --seed (default all)")
    parser.add_argument("--classes", default=None, type=class_list,
                        help="comma-separated class indices, ids or names (default all)")
    parser.add_argument("--reference", default="zero", choices=REFERENCE_CHOICES,
                        help="insertion/deletion reference image (default zero: a zero model input)")
    parser.add_argument("--step", type=positive_int, default=None,
                        help="pixels per insertion/deletion step (default the image width)")
    parser.add_argument("--start-layer", type=non_negative_int, default=0,
                        help="first block of the Chefer rollout (default 0)")
    parser.add_argument("--layerscale-rule", default="identity", choices=LAYERSCALE_CHOICES,
                        help="LayerScale relevance rule (default identity; eq14 is the paper's, not conservative)")
    parser.add_argument("--cp-attention", action="store_true",
                        help="Chefer: send the attention relevance only through V")
    parser.add_argument("--figure-classes", default=None, type=class_list,
                        help="classes of the Figure 4 rows (default the first four)")
    parser.add_argument("--chunk-size", type=positive_int, default=50, help="images per saved chunk (default 50)")
    parser.add_argument("--seed", type=any_int, default=0, help="seed of the image sample and the random maps")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="perturbed images per forward (default 256)")
    add_device_argument(parser, None, "torch device (default CUDA if available, else CPU)")
    parser.add_argument("--out", default=None, type=output_dir,
                        help="output folder (default runs/attribution-<model>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """A :class:`analyses.model.level.ModelLevelConfig` and the output folder."""
    from analyses.model.level import ModelLevelConfig

    config = ModelLevelConfig(
        model=args.model, dataset=args.data, split=args.split,
        sparsities=parse_numbers(args.sparsities, "--sparsities"), method=args.method,
        finetune_epochs=args.finetune_epochs, n_calib=args.n_calib, calib_sampling=args.calib_sampling,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), classes=parse_classes(args.classes),
        n_images=args.n_images, reference=args.reference, step=args.step, start_layer=args.start_layer,
        layerscale_rule=args.layerscale_rule, cp_attention=args.cp_attention,
        figure_classes=parse_classes(args.figure_classes), chunk_size=args.chunk_size, seed=args.seed,
        batch_size=args.batch_size, device=args.device,
    )
    return config, Path(args.out) if args.out else Path("runs") / f"attribution-{config.model}"


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit attribution``: run, print Table 4 and the files written."""
    config, out = config_from_args(args)
    from analyses.model.level import run_model_level

    result = run_model_level(config, out, show_progress=not args.no_progress)
    print(result.markdown())
    print(f"\nwrote {out}/table4.csv, table4.md, per_image.csv, figure4.png, curves.png, result.json "
          f"and per-chunk records under {out}/sparsity_*/chunks/")
    return 0


__all__ = ["add_arguments", "config_from_args", "main"]
