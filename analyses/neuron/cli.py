"""The ``hooked-vit neuron-metrics`` options (standard library only, so ``--help`` and bad options
answer without importing torch). Each option is checked while parsing, before any work starts.

The constants repeat those of :mod:`analyses.neuron.level` (tests/test_bad_inputs.py checks they agree).
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
    number_list,
    output_dir,
    positive_int,
)

SITE_NAMES: tuple[str, ...] = ("norm1", "q", "k", "v", "attn_out", "norm2", "mlp_act", "mlp_out", "attn_head")
NEURON_SITES: tuple[str, ...] = ("mlp_act", "attn_head")
SELECTIONS: tuple[str, ...] = ("drop", "absolute")
NEGATIVE_RULES: tuple[str, ...] = ("clamp", "shift")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit neuron-metrics`` options."""
    add_model_family_arguments(parser, DEFAULT_MODEL, DEFAULT_SPARSITIES)
    parser.add_argument("--split", default="val", help="split analysed (default val)")
    parser.add_argument("--means-split", default="train", help="split the ablation means are taken over")
    parser.add_argument("--classes", default=None, type=class_list,
                        help="comma-separated class indices, ids or names (default all)")
    parser.add_argument("--blocks", default=None,
                        type=number_list("--blocks", int, check=lambda v: v >= 0, valid="block indices must be >= 0"),
                        help="comma-separated blocks (default early, middle, late)")
    parser.add_argument("--top-k", type=positive_int, default=50, help="units per class and block (default 50)")
    parser.add_argument("--sites", default=",".join(NEURON_SITES), type=name_list("site", SITE_NAMES),
                        help=f"unit sites, comma-separated from {','.join(SITE_NAMES)}")
    parser.add_argument("--selection", default="drop", choices=SELECTIONS,
                        help="rank units by estimated logit drop (default) or absolute change")
    parser.add_argument("--negatives", default="clamp", choices=NEGATIVE_RULES,
                        help="rule for negative activations in class variance / label entropy")
    parser.add_argument("--pooled-means", action="store_true", help="ablate with means pooled over positions")
    parser.add_argument("--n-means-images", type=positive_int, default=None,
                        help="take the means over a class-balanced sample of this many images (default all)")
    parser.add_argument("--seed", type=any_int, default=0, help="seed of that sample")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per batch (default 64 CPU / 256 GPU)")
    add_device_argument(parser, None, "torch device (default CUDA if available, else CPU)")
    parser.add_argument("--out", default=None, type=output_dir,
                        help="output folder (default runs/neuron-metrics-<model>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
