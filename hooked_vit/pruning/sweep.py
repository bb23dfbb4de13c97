"""Accuracy vs sparsity sweep (the IMPACT paper's Table 1) for any model with a builtin dataset:
prune the dense model with each method at each sparsity, optionally fine-tune, evaluate top-1/top-5.

Each (method, sparsity) result is written to ``<out>/results/<method>_<sparsity>.json`` as soon as
it is known, with the settings that produced it; a rerun with the same settings skips finished
results (resume). ``sweep.csv``, ``sweep.md``, ``sweep.png`` and ``sweep.json`` are rewritten
from all results, each carrying the sweep settings (CSV: ``#`` comment lines, read with
``pandas.read_csv(path, comment="#")``; markdown: a settings block; PNG: the ``Description``
metadata field and a caption).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hooked_vit.cli_args import parse_numbers
from hooked_vit.cli_args import sweep_sparsity_arguments as add_arguments  # noqa: F401  (the CLI options)
from hooked_vit import atomic
from hooked_vit.data import load_dataset, make_loader
from hooked_vit.errors import check
from hooked_vit.evaluation import evaluate
from hooked_vit.pruning.cached import state_digest
from hooked_vit.pruning.calibration import DEFAULT_CALIB_SEED, check_sampling, resolve_calibration
from hooked_vit.pruning.finetuning import finetune
from hooked_vit.pruning.pruner import prune
from hooked_vit.pruning.validation import check_method, check_sparsity
from hooked_vit.reading import read_resumable_json

DEFAULT_SPARSITIES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9)
DEFAULT_MODEL = "deit3_tiny_digits"
METHOD_LABELS = {"magnitude": "Magnitude (per layer)", "magnitude_row": "Magnitude (per row)", "wanda": "Wanda"}


@dataclass
class SweepConfig:
    """Settings of a sweep over ``data`` (``"builtin"``: the model's own dataset, or an
    ImageNet-style root). ``finetune_*`` apply when ``finetune_epochs > 0`` (AdamW, cosine
    schedule, see :func:`~hooked_vit.pruning.finetune`; on the train split); calibration is
    ``n_calib`` train images drawn by ``calib_sampling`` with ``seed``; accuracy is measured on
    ``eval_split``. ``None`` settings take the model preset's protocol (:func:`resolve_protocol`)."""

    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = ("magnitude", "wanda")
    sparsities: tuple[float | int, ...] = DEFAULT_SPARSITIES
    data: str = "builtin"
    finetune_epochs: int | None = None
    finetune_lr: float | int = 1e-4
    finetune_batch_size: int = 64
    n_calib: int | None = None
    calib_sampling: str | None = None
    seed: int = DEFAULT_CALIB_SEED
    eval_split: str = "val"
    batch_size: int = 128
    device: str = "cpu"

    def result_settings(self, weights: str) -> dict[str, Any]:
        """What a single (method, sparsity) result depends on, besides method and sparsity."""
        data = asdict(self)
        for key in ("methods", "sparsities", "device", "batch_size"):
            data.pop(key)
        return {**data, "weights_sha256": weights}


def resolve_protocol(config: SweepConfig) -> SweepConfig:
    """``config`` with ``finetune_epochs``, ``n_calib`` and ``calib_sampling`` left ``None`` taken
    from the model preset (:func:`~hooked_vit.pruning.recipe.variant_protocol`)."""
    from hooked_vit.pruning.recipe import variant_protocol

    protocol = variant_protocol(config.model)
    return replace(config, **{key: protocol[key] for key in ("finetune_epochs", "n_calib", "calib_sampling")
                              if getattr(config, key) is None})


def check_config(config: SweepConfig) -> None:
    """:class:`~hooked_vit.errors.InvalidArgumentError` naming the first invalid setting of ``config``."""
    check(len(config.methods) > 0,
          f"methods must name at least one of wanda, magnitude, magnitude_row; got {config.methods!r}")
    check_sampling(config.calib_sampling)
    check(len(config.sparsities) > 0, f"sparsities must list at least one fraction in [0, 1); got {config.sparsities!r}")
    for s in config.sparsities:
        check_sparsity(s)
    for name, low in (("finetune_epochs", 0), ("finetune_batch_size", 1), ("n_calib", 1), ("batch_size", 1)):
        value = getattr(config, name)
        check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
              f"{name} must be a whole number >= {low}; got {value!r}")
    check(config.finetune_lr > 0, f"finetune_lr must be > 0; got {config.finetune_lr!r}")


def _result_path(out: Path, method: str, sparsity: float) -> Path:
    return out / "results" / ("dense.json" if sparsity == 0 else f"{method}_{sparsity:g}.json")


def _load_result(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished result in ``path`` if it was made with ``settings``; a corrupt file is moved
    aside with a warning (and the result recomputed)."""
    data = read_resumable_json(path, "a sweep result (JSON)")
    if not isinstance(data, dict) or data.get("settings") != settings or not isinstance(data.get("result"), dict):
        return None
    return data["result"]


def _accuracy(model, dataset, config: SweepConfig) -> dict[str, float]:
    metrics = evaluate(model, dataset, batch_size=config.batch_size, progress=False)
    return {"top1": float(metrics["top1"]), "top5": float(metrics["top5"])}


def run_sweep(config: SweepConfig, out: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the sweep, write its result files into ``out`` and return one row per
    (method, sparsity): ``top1``, ``top5`` (fractions), measured ``overall_sparsity`` and seconds."""
    from hooked_vit import HookedViT

    config = resolve_protocol(config)
    check_config(config)
    methods = tuple(check_method(m) for m in config.methods)
    sparsities = tuple(sorted({check_sparsity(s) for s in config.sparsities}))
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    dense = HookedViT.from_pretrained(config.model, device=config.device)
    eval_data = load_dataset(config.data, split=config.eval_split, model=dense)
    train_data = load_dataset(config.data, split="train", model=dense)
    calibration = resolve_calibration(dense, train_data, n=config.n_calib, seed=config.seed,
                                      sampling=config.calib_sampling) if "wanda" in methods else None
    settings = config.result_settings(state_digest(dense))
    rows: list[dict[str, Any]] = []
    todo = [("dense", 0.0)] if 0.0 in sparsities else []
    todo += [(m, s) for m in methods for s in sparsities if s > 0]
    for method, sparsity in todo:
        path = _result_path(out, method, sparsity)
        result = _load_result(path, settings)
        if result is None:
            if progress:
                print(f"[sweep] {config.model}: {method} at sparsity {sparsity:g}", flush=True)
            model = copy.deepcopy(dense)
            result = {"method": method, "sparsity": sparsity, "prune_seconds": 0.0, "finetune_seconds": 0.0}
            if method != "dense":
                info = prune(model, method, sparsity, calibration=calibration)
                result["prune_seconds"] = info.seconds
                if config.finetune_epochs > 0:
                    loader = make_loader(train_data, batch_size=config.finetune_batch_size, shuffle=True,
                                         seed=config.seed, device=config.device)
                    done = finetune(model, loader, config.finetune_epochs, lr=config.finetune_lr,
                                    seed=config.seed, progress=progress)
                    result["finetune_seconds"] = done.seconds
                result["overall_sparsity"] = model.pruning_info.overall_sparsity
            else:
                result["overall_sparsity"] = 0.0
            start = time.perf_counter()
            result.update(_accuracy(model, eval_data, config))
            result["eval_seconds"] = time.perf_counter() - start
            atomic.write_json(path, {"settings": settings, "result": result})
        if method == "dense":
            rows += [{**result, "method": m} for m in methods]
        else:
            rows.append(result)
        write_outputs(rows, config, out, plot=False)
    write_outputs(rows, config, out, plot=True)
    return rows


def _header(config: SweepConfig) -> dict[str, Any]:
    return {"sweep": asdict(config), "note": "sparsity 0.0 is the dense model (not fine-tuned)"}


def markdown_table(rows: list[dict[str, Any]], sparsities: tuple[float, ...]) -> str:
    """The paper's Table 1 layout: a Top-1 and a Top-5 row per method, one column per sparsity."""
    by_key = {(r["method"], r["sparsity"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    heads = ["0.0 (Dense)" if s == 0 else f"{s:g}" for s in sparsities]
    lines = ["| Method | Metric | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    for method in methods:
        for metric, label in (("top1", "Top-1"), ("top5", "Top-5")):
            cells = [f"{by_key[(method, s)][metric]:.4f}" if (method, s) in by_key else "" for s in sparsities]
            name = METHOD_LABELS.get(method, method) if metric == "top1" else ""
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], config: SweepConfig, out: Path, *, plot: bool = True) -> None:
    """Write ``sweep.csv``, ``sweep.md``, ``sweep.json`` (and with ``plot``, ``sweep.png``) into ``out``."""
    header = _header(config)
    header_json = json.dumps(header, sort_keys=True)
    sparsities = tuple(sorted({check_sparsity(s) for s in config.sparsities}))
    columns = ["method", "sparsity", "top1", "top5", "overall_sparsity", "prune_seconds", "finetune_seconds",
               "eval_seconds"]
    with atomic.open_atomic(out / "sweep.csv", "w", newline="") as f:
        f.write(f"# {header_json}\n")
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["method"], r["sparsity"])))
    ft = f", {config.finetune_epochs} epoch(s) of masked fine-tuning" if config.finetune_epochs else ", no fine-tuning"
    ft += f", {config.n_calib} {config.calib_sampling} calibration images"
    atomic.write_text(
        out / "sweep.md",
        f"Top-1 / top-5 accuracy of {config.model} on its {config.eval_split} split vs sparsity{ft}.\n\n"
        + markdown_table(rows, sparsities)
        + f"\n\nSettings:\n\n```json\n{json.dumps(header, indent=2, sort_keys=True)}\n```\n",
    )
    atomic.write_json(out / "sweep.json", {**header, "rows": rows})
    if plot:
        plot_sweep(rows, config, out / "sweep.png", header_json)


def plot_sweep(rows: list[dict[str, Any]], config: SweepConfig, path: Path, description: str) -> None:
    """Top-1 and top-5 accuracy vs sparsity, one line per method, settings in the PNG metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric, label in zip(axes, ("top1", "top5"), ("Top-1", "Top-5")):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["sparsity"], r[metric]) for r in rows if r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=METHOD_LABELS.get(method, method))
        ax.set_xlabel("sparsity (fraction of block Linear weights zeroed)")
        ax.set_ylabel(f"{label} accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    ft = f"{config.finetune_epochs} ep fine-tuning" if config.finetune_epochs else "no fine-tuning"
    fig.suptitle(f"{config.model} ({config.eval_split} split), {ft}, "
                 f"{config.n_calib} calibration images ({config.calib_sampling}), seed {config.seed}")
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120, metadata={"Description": description})
    plt.close(fig)


def config_from_args(args: argparse.Namespace) -> tuple[SweepConfig, Path]:
    """A :class:`SweepConfig` and output folder from parsed ``sweep-sparsity`` arguments."""
    config = SweepConfig(
        model=args.model, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        sparsities=parse_numbers(args.sparsities, "--sparsities"), data=args.data,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        finetune_batch_size=args.finetune_batch_size,
        n_calib=args.n_calib, calib_sampling=args.calib_sampling, seed=args.seed,
        eval_split=args.eval_split, batch_size=args.batch_size, device=args.device,
    )
    config = resolve_protocol(config)
    suffix = f"-ft{config.finetune_epochs}" if config.finetune_epochs else ""
    name = Path(config.model.removeprefix("alias:")).name or "model"  # an alias, or a saved model's folder name
    return config, Path(args.out) if args.out else Path("runs") / f"sweep-{name}{suffix}"


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit sweep-sparsity``: run the sweep, print the table and file paths."""
    config, out = config_from_args(args)
    start = time.perf_counter()
    rows = run_sweep(config, out)
    print(markdown_table(rows, tuple(sorted(set(config.sparsities)))))
    print(f"\n{time.perf_counter() - start:.0f} s; wrote {out}/sweep.csv, sweep.md, sweep.png, sweep.json")
    return 0
