"""Argument definitions of the ``hooked-vit`` subcommands, and the checks every option goes through.

Standard library only: ``hooked-vit --help``, ``hooked-vit CMD --help`` and argument errors must
answer without importing torch. Every option is checked by its argparse ``type`` while parsing,
before any work starts; a bad value ends the run with one line
``hooked-vit CMD: error: argument --epochs: must be a whole number >= 1; got '-1'`` and exit code 2.

Defaults that also live in heavy modules (``DEFAULT_ALIAS``, the sweep's sparsities, ...) are
repeated here; ``tests/test_bad_inputs.py`` checks that both copies agree.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence

from hooked_vit.errors import InvalidArgumentError

DEFAULT_ALIAS = "deit3_tiny_digits"  # = hooked_vit.training.DEFAULT_ALIAS
DEFAULT_SEED = 0  # = hooked_vit.training.DEFAULT_SEED
EMBEDDED_ALIASES = ("deit3_tiny_digits", "vit_tiny_digits_reg", "siglip_tiny_digits")  # = tuple(training.EMBEDDED_MODELS)
BUILTIN_DATASETS: tuple[str, ...] = ("digits",)  # = tuple(hooked_vit.data.BUILTIN_DATASETS)
PRUNING_METHODS: tuple[str, ...] = ("wanda", "magnitude", "magnitude_row")  # = hooked_vit.pruning.METHODS
DEFAULT_N_CALIB = 128  # = hooked_vit.pruning.DEFAULT_N_CALIB
DEFAULT_CALIB_SEED = 0  # = hooked_vit.pruning.DEFAULT_CALIB_SEED
CALIB_SAMPLINGS: tuple[str, ...] = ("quick", "reference")  # = hooked_vit.pruning.calibration.SAMPLINGS
SWEEP_SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9)  # = pruning.sweep.DEFAULT_SPARSITIES
_DEVICE = re.compile(r"^(cpu|meta|mps|(cuda|xpu|hpu|npu|privateuseone)(:\d+)?)$")


# ------------------------------------------------------------------------------ value checks
def _typed(name: str, check: Callable[[str], object]) -> Callable[[str], object]:
    check.__name__ = name  # argparse names the type in some messages
    return check


def _error(expected: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {expected}; got {text!r}")


def _int(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _error(expected, text) from None
    if value < low:
        raise _error(expected, text)
    return value


def _float(text: str, expected: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(expected, text) from None
    if not (math.isfinite(value) and ok(value)):
        raise _error(expected, text)
    return value


positive_int = _typed("positive_int", lambda text: _int(text, 1, "a whole number >= 1"))
non_negative_int = _typed("non_negative_int", lambda text: _int(text, 0, "a whole number >= 0"))
any_int = _typed("any_int", lambda text: _int(text, -(2**63), "a whole number"))
positive_float = _typed("positive_float", lambda text: _float(text, "a number > 0", lambda v: v > 0))
non_negative_float = _typed("non_negative_float", lambda text: _float(text, "a number >= 0", lambda v: v >= 0))


def device_name(text: str) -> str:
    """A torch device string: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ..."""
    if not _DEVICE.match(text):
        raise _error("a torch device such as cpu, cuda, cuda:0 or mps", text)
    return text


def output_dir(text: str) -> str:
    """A folder to write into: not empty, not an existing file."""
    if not text.strip():
        raise _error("a folder path (use . for the current directory)", text)
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder to write into")
    return text


def model_name(text: str) -> str:
    """A model alias, timm name, ``alias:NAME``, or a saved model directory (checked lightly:
    not empty; an ``alias:`` or path-like name must exist)."""
    if not text.strip():
        raise _error("a model alias (e.g. deit3_tiny_digits), a timm name or a saved model directory", text)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text
    if looks_like_path and not text.startswith("alias:") and not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"model directory {text!r} does not exist (a saved model directory, "
                                         "or an alias such as deit3_tiny_digits, was expected)")
    return text


def data_source(text: str) -> str:
    """``builtin``, a builtin dataset name, or an existing ImageNet-style folder."""
    if text in ("builtin", *BUILTIN_DATASETS) or os.path.isdir(text):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown dataset source {text!r}: neither a builtin dataset ({', '.join(BUILTIN_DATASETS)}, or 'builtin' for "
        "the model's own) nor an existing directory laid out as root/<split>/<wnid>/*.JPEG")


def parse_numbers(text: str, what: str, kind: type = float) -> tuple:
    """Comma-separated numbers such as ``"0,0.5,0.7"`` (``kind`` each), at least one;
    :class:`~hooked_vit.errors.InvalidArgumentError` naming the option ``what`` otherwise."""
    example = "0,0.5,0.7" if kind is float else "0,2,3"
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidArgumentError(f"{what} must be comma-separated numbers such as {example}; got {text!r}") from None
    if not values:
        raise InvalidArgumentError(f"{what} must list at least one number, e.g. {example}; got {text!r}")
    return values


def number_list(what: str, kind: type = float, *, check: Callable[[float], bool] = lambda v: True,
                valid: str = "") -> Callable[[str], str]:
    """An argparse type checking a comma-separated list (:func:`parse_numbers`, each value passing
    ``check``; ``valid`` says what is valid, e.g. "each sparsity must be in [0, 1)"); the text is kept
    as given (parsed again by the command)."""

    def checked(text: str) -> str:
        try:
            values = parse_numbers(text, what, kind)
        except InvalidArgumentError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{what} ")) from None
        bad = [v for v in values if not (math.isfinite(v) and check(v))]
        if bad:
            raise argparse.ArgumentTypeError(f"{valid}; got {', '.join(f'{v:g}' for v in bad)} in {text!r}")
        return text

    return _typed("number_list", checked)


def name_list(what: str, choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse type checking a non-empty comma-separated list of names from ``choices``."""

    def checked(text: str) -> str:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"must list at least one of {', '.join(choices)}; got {text!r}")
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))}; "
                                             f"choose from {', '.join(choices)}")
        return text

    return _typed("name_list", checked)


def class_list(text: str) -> str:
    """Comma-separated class indices (>= 0) or names; at least one."""
    if not parse_classes(text):
        raise _error("comma-separated class indices or names such as 0,3,cat", text)
    negative = [v for v in parse_classes(text) if isinstance(v, int) and v < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"class indices must be >= 0; got {negative} in {text!r}")
    return text


sparsity_list = number_list("--sparsities", check=lambda v: 0 <= v < 1,
                            valid="each sparsity must be in [0, 1) (a fraction; 0 is the dense model)")


def parse_classes(text: str | None) -> tuple[int | str, ...] | None:
    """Comma-separated class indices or names (``"0,3,cat"``); ``None`` stays ``None`` (all classes)."""
    if text is None:
        return None
    return tuple(int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in text.split(",") if v.strip())


# ------------------------------------------------------------------------------ shared options
def add_model_family_arguments(parser: argparse.ArgumentParser, default_model: str,
                               default_sparsities: Sequence[float]) -> None:
    """The options naming a dense model and its pruned variants, shared by the IMPACT analyses:
    ``--model --sparsities --method --finetune-epochs --data``."""
    parser.add_argument("--model", default=default_model, type=model_name,
                        help=f"model alias (default {default_model})")
    parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in default_sparsities), type=sparsity_list,
                        help="comma-separated fractions in [0, 1); 0 is the dense model")
    parser.add_argument("--method", default="wanda", choices=PRUNING_METHODS, help="pruning method")
    parser.add_argument("--finetune-epochs", type=non_negative_int, default=None,
                        help="masked fine-tuning epochs after pruning, on the train split of --data "
                             "(default: the model preset's, 2 as in the paper for DeiT-III and the embedded model; "
                             "0 = none)")
    add_calibration_arguments(parser)
    parser.add_argument("--data", default="builtin", type=data_source,
                        help="'builtin', 'digits' or an ImageNet-style folder root; variants are calibrated and "
                             "fine-tuned on its train split")


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """``--n-calib`` and ``--calib-sampling`` (defaults: the model preset's protocol)."""
    parser.add_argument("--n-calib", type=positive_int, default=None,
                        help="Wanda calibration images from the train split (default: the preset's, 4096 for "
                             f"ImageNet models, {DEFAULT_N_CALIB} for the embedded model)")
    parser.add_argument("--calib-sampling", default=None, choices=CALIB_SAMPLINGS,
                        help="'reference': drawn with replacement, training augmentation (Wanda's ViT code; ImageNet "
                             "default); 'quick': class-balanced without replacement, eval transform (embedded default)")


def add_device_argument(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    parser.add_argument("--device", default=default, type=device_name, help=help)


# ------------------------------------------------------------------------------ hooked_vit commands
def info_arguments(parser: argparse.ArgumentParser) -> None:
    """``hooked-vit info``."""
    parser.add_argument("--model", default=DEFAULT_ALIAS, type=model_name,
                        help=f"alias, timm name or saved directory (default {DEFAULT_ALIAS})")
    add_device_argument(parser, None, "torch device (default cpu)")


def train_default_arguments(parser: argparse.ArgumentParser) -> None:
    """``hooked-vit train-default``."""
    parser.add_argument("--model", default=DEFAULT_ALIAS, choices=EMBEDDED_ALIASES,
                        help=f"embedded model to train (default {DEFAULT_ALIAS})")
    parser.add_argument("--seed", type=any_int, default=DEFAULT_SEED,
                        help="initialisation, shuffling and augmentation seed")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="number of epochs, >= 1 (default: the recipe's 60)")
    parser.add_argument("--out", default=f"runs/{DEFAULT_ALIAS}", type=output_dir,
                        help=f"output directory for {DEFAULT_ALIAS}.safetensors/.json (pretrained_configs to "
                             f"replace the shipped model; default runs/{DEFAULT_ALIAS})")
    parser.add_argument("--n-train", type=positive_int, default=None,
                        help="train on a class-balanced slice of this many images (quick checks; default all 1,437)")
    parser.add_argument("--n-val", type=positive_int, default=None,
                        help="validate on a class-balanced slice of this many images (default all 360)")
    add_device_argument(parser, "cpu", "torch device (default cpu, as the shipped weights)")


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """``hooked-vit evaluate``."""
    parser.add_argument("--model", default=DEFAULT_ALIAS, type=model_name,
                        help=f"alias, timm name or saved directory (default {DEFAULT_ALIAS})")
    parser.add_argument("--data", default="builtin", type=data_source,
                        help="'builtin' (the model's own dataset), 'digits', or an ImageNet-style folder root")
    parser.add_argument("--split", default="val", help="split (default val)")
    parser.add_argument("--subset", default=None, help="named class subset, e.g. impact100 (ImageNet folders)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per batch (default 64 CPU / 256 GPU)")
    add_device_argument(parser, None, "torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sweep_sparsity_arguments(parser: argparse.ArgumentParser) -> None:
    """``hooked-vit sweep-sparsity``."""
    parser.add_argument("--model", default=DEFAULT_ALIAS, type=model_name,
                        help=f"model alias (default {DEFAULT_ALIAS})")
    parser.add_argument("--methods", default="wanda,magnitude", type=name_list("method", PRUNING_METHODS),
                        help="comma-separated from wanda, magnitude (per layer, Han et al.), "
                             "magnitude_row (per output row)")
    parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SWEEP_SPARSITIES), type=sparsity_list,
                        help="comma-separated fractions in [0, 1); 0 is the dense model")
    parser.add_argument("--data", default="builtin", type=data_source,
                        help="'builtin' (the model's own dataset) or an ImageNet-style folder root: calibration and "
                             "fine-tuning use its train split, accuracy --eval-split")
    parser.add_argument("--finetune-epochs", type=non_negative_int, default=None,
                        help="masked fine-tuning epochs after pruning (default: the model preset's, 2 for DeiT-III as "
                             "in the paper's Table 1, also for the embedded model; 0 = none)")
    parser.add_argument("--finetune-lr", type=positive_float, default=1e-4)
    parser.add_argument("--finetune-batch-size", type=positive_int, default=64)
    add_calibration_arguments(parser)
    parser.add_argument("--seed", type=any_int, default=DEFAULT_CALIB_SEED,
                        help="calibration sample and fine-tuning seed")
    parser.add_argument("--eval-split", default="val", help="split to measure accuracy on (default val)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="evaluation batch size")
    add_device_argument(parser, "cpu", "torch device (default cpu)")
    parser.add_argument("--out", default=None, type=output_dir,
                        help="output folder (default runs/sweep-<model>[-ft<N>])")
