"""``hooked-vit impact``: the whole study in one command (options: standard library only, so
``--help`` and bad options answer without importing torch).

Settings come from, in rising precedence: the preset (``--preset``, default ``quick``), the TOML
file (``--config``), then the options given here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.common.level import LEVEL_NAMES
from hooked_vit.cli_args import (
    CALIB_SAMPLINGS,
    PRUNING_METHODS,
    add_device_argument,
    data_source,
    model_name,
    name_list,
    non_negative_int,
    output_dir,
    parse_numbers,
    positive_int,
    sparsity_list,
)

PRESET_NAMES: tuple[str, ...] = ("quick", "full", "paper")  # = analyses.impact.config.PRESETS
level_list = name_list("--levels", LEVEL_NAMES)
method_list = name_list("--methods", PRUNING_METHODS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit impact`` options."""
    parser.add_argument("--preset", default=None, choices=PRESET_NAMES,
                        help="quick: the embedded model, reduced where a level's full run takes long (minutes on a "
                             "CPU); full: the embedded model, every level's full protocol; paper: deit3_base with "
                             "the paper's settings (needs --data, an ImageNet folder). Default: quick, or the "
                             "config file's")
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="a study config (TOML; e.g. the study.toml a run writes); options given here win")
    parser.add_argument("--model", default=None, type=model_name, help="model alias or saved folder (default: the preset's)")
    parser.add_argument("--data", default=None, type=data_source,
                        help="'builtin' or an ImageNet-style folder root (default builtin)")
    parser.add_argument("--methods", default=None, type=method_list,
                        help=f"comma-separated pruning methods, of {', '.join(PRUNING_METHODS)} (default wanda)")
    parser.add_argument("--sparsities", default=None, type=sparsity_list,
                        help="comma-separated fractions in [0, 1), 0 (dense) included (default 0,0.1,0.3,0.5,0.7)")
    parser.add_argument("--finetune-epochs", type=non_negative_int, default=None,
                        help="masked fine-tuning epochs of each variant (default: the model preset's, 2)")
    parser.add_argument("--n-calib", type=positive_int, default=None, help="Wanda calibration images (default: the preset's)")
    parser.add_argument("--calib-sampling", default=None, choices=CALIB_SAMPLINGS, help="calibration sampling")
    parser.add_argument("--levels", default=None, type=level_list,
                        help=f"comma-separated levels to run, of {', '.join(LEVEL_NAMES)} (default all)")
    add_device_argument(parser, None, "torch device (default CUDA if available, else CPU; under torchrun each "
                                      "process's own GPU)")
    parser.add_argument("--out", default=None, type=output_dir,
                        help="output folder (default runs/impact-<model>-<preset>)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild report.md/report.html from the results saved in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def options(args: argparse.Namespace) -> dict:
    """The :class:`~analyses.impact.config.StudyConfig` fields given as options."""
    given = {"model": args.model, "data": args.data, "finetune_epochs": args.finetune_epochs, "n_calib": args.n_calib,
             "calib_sampling": args.calib_sampling, "device": args.device,
             "methods": None if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip()),
             "sparsities": None if args.sparsities is None else parse_numbers(args.sparsities, "--sparsities"),
             "levels": None if args.levels is None else tuple(n.strip() for n in args.levels.split(",") if n.strip())}
    return {key: value for key, value in given.items() if value is not None}


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit impact``: run or resume the study, print the report."""
    import time

    from analyses.impact.config import load_config, preset
    from analyses.impact.runner import run, stored_config

    if args.report_only:
        if args.out is None:
            raise ValueError("--report-only needs --out, the folder of the study")
        config = stored_config(args.out)
    elif args.config is not None:
        config = load_config(args.config, **({"preset": args.preset} if args.preset else {}), **options(args))
    else:
        config = preset(args.preset or "quick", **options(args))
    name = Path(config.model.removeprefix("alias:")).name or "model"
    out = Path(args.out) if args.out else Path("runs") / f"impact-{name}-{config.preset}"
    start = time.perf_counter()
    report = run(config, out, report_only=args.report_only, show_progress=not args.no_progress)
    if report is not None:
        print(report.markdown)
        print(f"\n{time.perf_counter() - start:.0f} s; wrote {report.path_md} and {report.path_html}")
    return 0
