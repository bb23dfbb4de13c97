"""The analyses' ``hooked-vit`` subcommands, registered as a plugin of :mod:`hooked_vit.cli` (the
``hooked_vit.subcommands`` entry point in ``pyproject.toml``): ``impact`` (the whole study) and one
subcommand per level, named as the level, whose options are its config's fields
(:mod:`analyses.common.options`). Only names are registered here: a level's light config module is
imported when its subcommand is chosen, its computation after the options are checked, so
``hooked-vit --help`` stays fast. The earlier subcommand names still work for one release.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from analyses.common.level import BUILTIN, config_class
from hooked_vit.cli import register
from hooked_vit.cli_args import output_dir

HELP: dict[str, str] = {
    "accuracy": "top-1/top-5 of the dense model and its pruned variants (IMPACT Table 1)",
    "neuron": "neuron level: ablation impact, selectivity, class variance, label entropy of the top units per "
              "class vs sparsity (IMPACT Figure 2)",
    "layer": "layer level: BatchTopK SAEs (sae-lens) trained on each model, their quality and latent metrics "
             "(IMPACT Table 2, Figure 3; Tables 5/6 with --sweep-*)",
    "circuit": "circuit level: node-mask circuits per class, node and edge fractions, accuracy, NCQ (IMPACT Table 3, "
               "Table 7 with --sweep-k)",
    "model": "model level: attribution maps (Chefer, AttnLRP, rollout, random) and their insertion/deletion AUCs "
             "(IMPACT Table 4, Figure 4)",
    "transcoders": "cross-layer transcoders in place of the MLPs: per-layer reconstruction, replacement accuracy, "
                   "each layer's contribution to the final representation (Chatzoudis et al. 2026)",
    "mis": "machine interpretability score: 2AFC tasks per unit (neurons, heads, residual dims, SAE latents) "
           "scored without humans (Zimmermann et al. 2024), per sparsity",
    "replacement": "residual replacement model: sae-lens TopK SAEs on every layer's residual stream, replacement "
                   "accuracy, feature catalogue, attribution graphs per class, faithfulness curves (Kim et al. 2025)",
}
# Earlier subcommand names (kept for one release) -> the level they now run.
ALIASES: dict[str, str] = {"neuron-metrics": "neuron", "sae-train": "layer", "sae-eval": "layer",
                           "circuits": "circuit", "attribution": "model"}


def level_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Level ``name``'s options: its config's fields, ``--out`` and ``--no-progress``."""
    from analyses.common.options import add_config_options

    add_config_options(parser, config_class(name))
    parser.add_argument("--out", default=None, type=output_dir, help=f"output folder (default runs/{name}-<model>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_level_command(name: str, args: argparse.Namespace, *, alias: str | None = None) -> int:
    """``hooked-vit <level>``: build the config from the options (checked before any work), run or
    resume the level into ``--out``, print its tables and the files written."""
    from analyses.common.options import given_options
    from analyses.common.results import config_from_dict

    if alias is not None:
        print(f"hooked-vit: notice: `{alias}` is now `hooked-vit {name}` (same options); the old name goes in the "
              "next release", file=sys.stderr)
    config = config_from_dict(config_class(name), given_options(args, config_class(name)))
    out = Path(args.out) if args.out else Path("runs") / f"{name}-{Path(config.model.removeprefix('alias:')).name}"
    from analyses.common.level import get_level, run_level
    from analyses.common.processes import start, stop
    from analyses.common.results import config_to_dict

    processes = start()  # under torchrun: the processes share the units, the first writes the result
    try:
        settings = config_to_dict(config)
        if hasattr(config, "device"):
            config.device = processes.device(config.device)
        result = run_level(get_level(name)(show_progress=not args.no_progress and processes.is_main), config, out,
                           shard=processes.shard, barrier=processes.barrier, done_settings=settings)
    finally:
        stop(processes)
    if processes.is_main:
        print(result.markdown())
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        print(f"\nwrote {out}/: {', '.join(files)}")
    return 0


register("impact", "the whole IMPACT study in one resumable command: the dense and pruned models at every level, "
         "with report.md/.html (runs under torchrun too)", "analyses.impact.cli:add_arguments",
         "analyses.impact.cli:main")
for _name in BUILTIN:
    register(_name, HELP[_name], partial(level_arguments, _name), partial(run_level_command, _name))
for _alias, _name in ALIASES.items():
    register(_alias, f"earlier name of `{_name}` (kept for one release)", partial(level_arguments, _name),
             partial(run_level_command, _name, alias=_alias))

__all__ = ["ALIASES", "HELP", "level_arguments", "run_level_command"]
