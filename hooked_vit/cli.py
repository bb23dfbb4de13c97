"""``hooked-vit`` command line: ``info``, ``train-default``, ``evaluate``.

Subcommands live in a registry: a function ``run(args) -> exit code`` decorated with
:func:`subcommand`, which names it, gives its help line and a function adding its arguments.
A new subcommand is one decorated function here (or in a module imported here)::

    @subcommand("prune-sweep", "accuracy against sparsity", configure=_prune_sweep_arguments)
    def prune_sweep(args: argparse.Namespace) -> int: ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hooked_vit.training import DEFAULT_ALIAS, DEFAULT_SEED

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Subcommand:
    """A registered subcommand: its name, one-line help, argument setup and entry function."""

    name: str
    help: str
    configure: Configure
    run: Run


SUBCOMMANDS: dict[str, Subcommand] = {}


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure function of a subcommand without arguments."""


def subcommand(name: str, help: str, *, configure: Configure = _no_arguments) -> Callable[[Run], Run]:
    """Register the decorated ``run(args) -> exit code`` as subcommand ``name``."""

    def register(run: Run) -> Run:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        SUBCOMMANDS[name] = Subcommand(name, help, configure, run)
        return run

    return register


def parse_numbers(text: str, what: str, kind: type = float) -> tuple:
    """Comma-separated numbers such as ``"0,0.5,0.7"`` (``kind`` each); ``ValueError`` naming
    the option ``what`` otherwise."""
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers such as 0,0.5,0.7; got {text!r}") from None


def parse_classes(text: str | None) -> tuple[int | str, ...] | None:
    """Comma-separated class indices or names (``"0,3,cat"``); ``None`` stays ``None`` (all classes)."""
    if text is None:
        return None
    return tuple(int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in text.split(",") if v.strip())


def add_model_family_arguments(parser: argparse.ArgumentParser, default_model: str,
                               default_sparsities: Sequence[float]) -> None:
    """The options naming a dense model and its pruned variants, shared by the IMPACT analyses:
    ``--model --sparsities --method --finetune-epochs --data``."""
    parser.add_argument("--model", default=default_model, help=f"model alias (default {default_model})")
    parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in default_sparsities),
                        help="comma-separated fractions in [0, 1); 0 is the dense model")
    parser.add_argument("--method", default="wanda", help="pruning method (wanda or magnitude)")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="masked fine-tuning epochs after pruning")
    parser.add_argument("--data", default="builtin", help="'builtin', 'digits' or an ImageNet-style folder root")


def _load_model(name: str, device: str | None) -> Any:
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained(name, device=device)


# ---------------------------------------------------------------------------------------- info
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_ALIAS,
                        help=f"alias, timm name or saved directory (default {DEFAULT_ALIAS})")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")


@subcommand("info", "print a model's architecture and hook table", configure=_info_arguments)
def info(args: argparse.Namespace) -> int:
    model = _load_model(args.model, args.device)
    print(model.summary())
    return 0


# ------------------------------------------------------------------------------- train-default
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="initialisation, shuffling and augmentation seed")
    parser.add_argument("--epochs", type=int, default=None, help="number of epochs (default: the recipe's 60)")
    parser.add_argument("--out", default=f"runs/{DEFAULT_ALIAS}",
                        help=f"output directory for {DEFAULT_ALIAS}.safetensors/.json (pretrained_configs to "
                             f"replace the shipped model; default runs/{DEFAULT_ALIAS})")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu, as the shipped weights)")


@subcommand("train-default", f"train the embedded default model {DEFAULT_ALIAS} on the builtin digits",
            configure=_train_arguments)
def train_default_command(args: argparse.Namespace) -> int:
    from hooked_vit.training import save_default, train_default, training_command

    result = train_default(seed=args.seed, epochs=args.epochs, device=args.device, log=print)
    command = training_command(args.seed, args.epochs, args.out)
    weights, config = save_default(result, args.out, command=command)
    print(f"trained in {result.seconds:.0f} s: val top-1 {result.val['top1']:.4f}, top-5 {result.val['top5']:.4f} "
          f"on {result.val['n']} images")
    print(f"wrote {weights} and {config}")
    return 0


# ------------------------------------------------------------------------------------ evaluate
def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_ALIAS,
                        help=f"alias, timm name or saved directory (default {DEFAULT_ALIAS})")
    parser.add_argument("--data", default="builtin",
                        help="'builtin' (the model's own dataset), 'digits', or an ImageNet-style folder root")
    parser.add_argument("--split", default="val", help="split (default val)")
    parser.add_argument("--subset", default=None, help="named class subset, e.g. impact100 (ImageNet folders)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64 CPU / 256 GPU)")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    """Two left-aligned columns."""
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


@subcommand("evaluate", "top-1/top-5 accuracy of a model on a dataset", configure=_evaluate_arguments)
def evaluate_command(args: argparse.Namespace) -> int:
    from hooked_vit.data import load_dataset
    from hooked_vit.evaluation import evaluate

    model = _load_model(args.model, args.device)
    dataset = load_dataset(args.data, split=args.split, model=model, subset=args.subset)
    result = evaluate(model, dataset, batch_size=args.batch_size, progress=not args.no_progress)
    report = {"model": args.model, "data": dataset.name, "split": dataset.split,
              **({"subset": args.subset} if args.subset else {}), **result}
    print(format_table([
        ("model", args.model),
        ("data", f"{dataset.name}/{dataset.split}{'/' + args.subset if args.subset else ''} ({result['n']} images, "
                 f"{len(dataset.present_classes())} classes)"),
        ("top-1", f"{100 * result['top1']:.2f} %"),
        ("top-5", f"{100 * result['top5']:.2f} %"),
        ("loss", f"{result['loss']:.4f}"),
    ]))
    print(json.dumps(report))
    return 0


# ------------------------------------------------------------------------------ sweep-sparsity
def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from hooked_vit.pruning.sweep import add_arguments

    add_arguments(parser)


@subcommand("sweep-sparsity", "top-1/top-5 vs sparsity for Wanda and magnitude pruning (IMPACT Table 1)",
            configure=_sweep_arguments)
def sweep_sparsity_command(args: argparse.Namespace) -> int:
    from hooked_vit.pruning.sweep import main as sweep_main

    return sweep_main(args)


# ------------------------------------------------------------------------------ neuron-metrics
def _neuron_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    from analyses.neuron_level import add_arguments

    add_arguments(parser)


@subcommand("neuron-metrics", "neuron-level metrics (ablation impact, selectivity, class variance, label entropy) "
            "vs sparsity (IMPACT Fig. 2)", configure=_neuron_metrics_arguments)
def neuron_metrics_command(args: argparse.Namespace) -> int:
    from analyses.neuron_level import main as neuron_metrics_main

    return neuron_metrics_main(args)


# ---------------------------------------------------------------------------- sae-train, sae-eval
def _sae_train_arguments(parser: argparse.ArgumentParser) -> None:
    from analyses.layer_level import add_train_arguments

    add_train_arguments(parser)


@subcommand("sae-train", "train BatchTopK SAEs (sae-lens) on a hook of the dense and pruned models, resumable; "
            "with --sweep-* the SAE sweep (IMPACT Tables 5/6)", configure=_sae_train_arguments)
def sae_train_command(args: argparse.Namespace) -> int:
    from analyses.layer_level import train_main

    return train_main(args)


def _sae_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from analyses.layer_level import add_eval_arguments

    add_eval_arguments(parser)


@subcommand("sae-eval", "SAE quality (NMSE, explained variance, dead latents; IMPACT Table 2) and latent metrics "
            "vs sparsity (IMPACT Fig. 3) of the SAEs trained by sae-train", configure=_sae_eval_arguments)
def sae_eval_command(args: argparse.Namespace) -> int:
    from analyses.layer_level import eval_main

    return eval_main(args)


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered subcommand."""
    parser = argparse.ArgumentParser(prog="hooked-vit", description="Hooked DeiT-III Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code; errors
    in the user's input (missing files, unknown names) print one line to stderr and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"hooked-vit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
