"""``hooked-vit impact``: the whole study in one command (options: standard library only, so
``--help`` and bad options answer without importing torch).

Settings come from, in rising precedence: the preset (``--preset``, default ``quick``), the TOML
file (``--config``), then the options given here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.common.options import add_config_options
from analyses.impact.config import StudyConfig
from hooked_vit.cli_args import output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit impact`` options: :class:`StudyConfig`'s fields (per-level settings go in a
    ``--config`` file), and how to run."""
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="a study config (TOML; e.g. the study.toml a run writes); options given here win")
    add_config_options(parser, StudyConfig, skip=("level",))
    parser.add_argument("--out", default=None, type=output_dir,
                        help="output folder (default runs/impact-<model>-<preset>)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild report.md/report.html from the results saved in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit impact``: run or resume the study, print the report."""
    import time

    from analyses.common.options import given_options
    from analyses.impact.config import load_config, preset
    from analyses.impact.runner import run, stored_config

    options = given_options(args, StudyConfig)
    chosen = options.pop("preset", None)

    if args.report_only:
        if args.out is None:
            raise ValueError("--report-only needs --out, the folder of the study")
        config = stored_config(args.out)
    elif args.config is not None:
        config = load_config(args.config, **({"preset": chosen} if chosen else {}), **options)
    else:
        config = preset(chosen or "quick", **options)
    name = Path(config.model.removeprefix("alias:")).name or "model"
    out = Path(args.out) if args.out else Path("runs") / f"impact-{name}-{config.preset}"
    start = time.perf_counter()
    report = run(config, out, report_only=args.report_only, show_progress=not args.no_progress)
    if report is not None:
        print(report.markdown)
        print(f"\n{time.perf_counter() - start:.0f} s; wrote {report.path_md} and {report.path_html}")
    return 0
