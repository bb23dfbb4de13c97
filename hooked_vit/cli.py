"""``hooked-vit`` command line: ``info``, ``train-default``, ``evaluate``, ``sweep-sparsity``, and
the subcommands of installed plugins (the analyses': ``impact``, ``neuron-metrics``, ``sae-train``,
``sae-eval``, ``circuits``, ``attribution``).

Subcommands live in a lazy registry, :data:`SUBCOMMANDS`: each entry names the subcommand, gives its
help line, and says where its argument definitions and its ``run(args) -> exit code`` function live,
as ``"module:function"`` strings (or the functions themselves). Only the chosen subcommand's
argument module is imported (standard library only, e.g. :mod:`hooked_vit.cli_args`), and its run
module only after the arguments are parsed and checked, so ``--help`` and argument errors answer
without importing torch. ``hooked_vit`` never imports ``analyses``.
A new subcommand is one line::

    register("circuits", "circuit discovery ...", "analyses.circuits.cli:add_arguments", "analyses.circuits.cli:main")

(or the :func:`subcommand` decorator on a ``run`` function defined in an imported module). Other
packages add subcommands as plugins: a module named in their ``hooked_vit.subcommands`` entry-point
group is imported before parsing and registers its own (:func:`load_plugins`); the IMPACT analyses
come in that way, from ``analyses.cli``.

Errors: a :class:`~hooked_vit.errors.HookedViTError` (or ``ValueError`` / ``FileNotFoundError``
from an input check) prints ``hooked-vit CMD: error: <message>`` on one line and exits 2;
``--debug`` shows the traceback instead. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hooked_vit.bars import SWITCH as BARS_SWITCH
from hooked_vit.bars import disable_bars
from hooked_vit.cli_args import (  # noqa: F401  (parse_* and add_model_family_arguments: public API here too)
    DEFAULT_ALIAS,
    add_model_family_arguments,
    parse_classes,
    parse_numbers,
)
from hooked_vit.cpu_memory import retain_freed_memory
from hooked_vit.errors import HookedViTError

Run = Callable[[argparse.Namespace], int]
Target = str | Callable  # "module:function", or the function itself


def resolve(target: Target) -> Callable:
    """The function a registry entry names: ``"package.module:function"`` is imported now."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Subcommand:
    """A registered subcommand: its name, one-line help, argument setup and entry function (each a
    function or a ``"module:function"`` string resolved only when this subcommand runs)."""

    name: str
    help: str
    configure: Target
    run: Target


SUBCOMMANDS: dict[str, Subcommand] = {}
PLUGIN_GROUP = "hooked_vit.subcommands"
_loaded_plugins: set[str] = set()


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure function of a subcommand without arguments."""


def register(name: str, help: str, configure: Target, run: Target) -> None:
    """Register subcommand ``name``; ``configure`` adds its options, ``run(args)`` returns the exit code."""
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = Subcommand(name, help, configure, run)


def subcommand(name: str, help: str, *, configure: Target = _no_arguments) -> Callable[[Run], Run]:
    """Register the decorated ``run(args) -> exit code`` as subcommand ``name``."""

    def decorate(run: Run) -> Run:
        register(name, help, configure, run)
        return run

    return decorate


def _load_model(name: str, device: str | None) -> Any:
    from hooked_vit import HookedViT

    return HookedViT.from_pretrained(name, device=device)


# ------------------------------------------------------------------------------ run functions
def info(args: argparse.Namespace) -> int:
    """``hooked-vit info``: the model's summary and hook table."""
    model = _load_model(args.model, args.device)
    print(model.summary())
    return 0


def train_default_command(args: argparse.Namespace) -> int:
    """``hooked-vit train-default``: train and save an embedded model (default: the embedded default)."""
    from hooked_vit.training import save_default, train_embedded, training_command

    result = train_embedded(args.model, seed=args.seed, epochs=args.epochs, device=args.device, log=print,
                            n_train=args.n_train, n_val=args.n_val)
    command = training_command(args.seed, args.epochs, args.out, n_train=args.n_train, n_val=args.n_val,
                               alias=args.model)
    weights, config = save_default(result, args.out, command=command)
    print(f"trained in {result.seconds:.0f} s: val top-1 {result.val['top1']:.4f}, top-5 {result.val['top5']:.4f} "
          f"on {result.val['n']} images")
    print(f"wrote {weights} and {config}")
    return 0


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    """Two left-aligned columns."""
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def evaluate_command(args: argparse.Namespace) -> int:
    """``hooked-vit evaluate``: top-1/top-5 accuracy as a table and a JSON line."""
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


# ------------------------------------------------------------------------------ the registry
register("info", "print a model's architecture and hook table",
         "hooked_vit.cli_args:info_arguments", "hooked_vit.cli:info")
register("train-default", f"train an embedded model on the builtin digits (default {DEFAULT_ALIAS})",
         "hooked_vit.cli_args:train_default_arguments", "hooked_vit.cli:train_default_command")
register("evaluate", "top-1/top-5 accuracy of a model on a dataset",
         "hooked_vit.cli_args:evaluate_arguments", "hooked_vit.cli:evaluate_command")
register("sweep-sparsity", "top-1/top-5 vs sparsity for Wanda and magnitude pruning (IMPACT Table 1)",
         "hooked_vit.cli_args:sweep_sparsity_arguments", "hooked_vit.pruning.sweep:main")


def load_plugins() -> None:
    """Import the modules that installed packages name in the ``hooked_vit.subcommands`` entry-point
    group (``analyses.cli`` registers the IMPACT analyses): each registers its subcommands, so
    ``hooked_vit`` never imports them by name."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.value not in _loaded_plugins:
            _loaded_plugins.add(entry.value)
            entry.load()


# ---------------------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _debug_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of an error instead of one line")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered subcommand; with ``only``, only that
    subcommand's options are defined (the others' argument modules are not imported)."""
    load_plugins()
    parser = _Parser(prog="hooked-vit", description="Hooked DeiT-III Vision Transformers.")
    _debug_option(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        # argparse %-formats help texts: a literal "%" (e.g. "Node %") must not break --help.
        sub = commands.add_parser(command.name, help=command.help.replace("%", "%%"), description=command.help)
        if only is None or command.name == only:
            resolve(command.configure)(sub)
            _debug_option(sub, argparse.SUPPRESS)
        sub.set_defaults(run=command.run)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), if registered."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    return f"hooked-vit: warning: {one_line(message)}\n"


def one_line(error: BaseException | str) -> str:
    """An error's (or warning's) message on one line."""
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code. A bad
    option is reported while parsing, before anything runs; errors in the user's input found later
    (missing files, unknown names, corrupt files) also print one line to stderr; both return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    load_plugins()
    try:
        args = build_parser(only=_chosen_command(argv)).parse_args(argv)
    except SystemExit as exit:  # --help (0) or a bad option (2, one line already printed)
        return exit.code if isinstance(exit.code, int) else 2
    previous_format, previous_bars = warnings.formatwarning, os.environ.get(BARS_SWITCH)
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    retain_freed_memory()  # big CPU batches reuse freed memory instead of faulting it in again
    if getattr(args, "no_progress", False):
        disable_bars()  # before the subcommand imports any library that draws bars (tqdm reads it once)
    try:
        return resolve(args.run)(args)
    except BrokenPipeError:  # stdout piped into a reader that stopped early, e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (HookedViTError, ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"hooked-vit {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous_format
        if previous_bars is None:  # main() called in-process (tests, notebooks) leaves the switch as it was
            os.environ.pop(BARS_SWITCH, None)
        else:
            os.environ[BARS_SWITCH] = previous_bars


if __name__ == "__main__":
    sys.exit(main())
