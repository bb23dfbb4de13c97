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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hooked_vit.cli import parse_numbers
from hooked_vit.data import load_dataset, make_loader
from hooked_vit.evaluation import evaluate
from hooked_vit.pruning.cached import state_digest
from hooked_vit.pruning.calibration import DEFAULT_CALIB_SEED, DEFAULT_N_CALIB, resolve_calibration
from hooked_vit.pruning.finetuning import finetune
from hooked_vit.pruning.pruner import prune
from hooked_vit.pruning.validation import check_method, check_sparsity

DEFAULT_SPARSITIES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9)
DEFAULT_MODEL = "deit3_tiny_digits"
METHOD_LABELS = {"magnitude": "Magnitude", "wanda": "Wanda"}


@dataclass
class SweepConfig:
    """Settings of a sweep. ``finetune_*`` apply when ``finetune_epochs > 0`` (AdamW, cosine
    schedule, see :func:`~hooked_vit.pruning.finetune`); calibration is ``n_calib`` train images
    drawn with ``seed``; accuracy is measured on ``eval_split``."""

    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = ("magnitude", "wanda")
    sparsities: tuple[float | int, ...] = DEFAULT_SPARSITIES
    finetune_epochs: int = 0
    finetune_lr: float | int = 1e-4
    finetune_batch_size: int = 64
    n_calib: int = DEFAULT_N_CALIB
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


def _result_path(out: Path, method: str, sparsity: float) -> Path:
    return out / "results" / ("dense.json" if sparsity == 0 else f"{method}_{sparsity:g}.json")


def _load_result(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["result"] if data.get("settings") == settings else None


def _accuracy(model, dataset, config: SweepConfig) -> dict[str, float]:
    metrics = evaluate(model, dataset, batch_size=config.batch_size, progress=False)
    return {"top1": float(metrics["top1"]), "top5": float(metrics["top5"])}


def run_sweep(config: SweepConfig, out: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the sweep, write its result files into ``out`` and return one row per
    (method, sparsity): ``top1``, ``top5`` (fractions), measured ``overall_sparsity`` and seconds."""
    from hooked_vit import HookedViT

    methods = tuple(check_method(m) for m in config.methods)
    sparsities = tuple(sorted({check_sparsity(s) for s in config.sparsities}))
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    dense = HookedViT.from_pretrained(config.model, device=config.device)
    dataset_name = dense.cfg.dataset
    eval_data = load_dataset(dataset_name, split=config.eval_split, model=dense)
    train_data = load_dataset(dataset_name, split="train", model=dense)
    calibration = resolve_calibration(dense, train_data, n=config.n_calib, seed=config.seed)
    calibration.identity.update(name=dataset_name, split="train")
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
            path.write_text(json.dumps({"settings": settings, "result": result}, indent=2))
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
    with open(out / "sweep.csv", "w", newline="") as f:
        f.write(f"# {header_json}\n")
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["method"], r["sparsity"])))
    ft = f", {config.finetune_epochs} epoch(s) of masked fine-tuning" if config.finetune_epochs else ", no fine-tuning"
    (out / "sweep.md").write_text(
        f"Top-1 / top-5 accuracy of {config.model} on its {config.eval_split} split vs sparsity{ft}.\n\n"
        + markdown_table(rows, sparsities)
        + f"\n\nSettings:\n\n```json\n{json.dumps(header, indent=2, sort_keys=True)}\n```\n"
    )
    (out / "sweep.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
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
                 f"{config.n_calib} calibration images, seed {config.seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Description": description})
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooked-vit sweep-sparsity`` options."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias (default {DEFAULT_MODEL})")
    parser.add_argument("--methods", default="wanda,magnitude", help="comma-separated: wanda,magnitude")
    parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in DEFAULT_SPARSITIES),
                        help="comma-separated fractions in [0, 1); 0 is the dense model")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="masked fine-tuning epochs after pruning")
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--finetune-batch-size", type=int, default=64)
    parser.add_argument("--n-calib", type=int, default=DEFAULT_N_CALIB, help="Wanda calibration images (train split)")
    parser.add_argument("--seed", type=int, default=DEFAULT_CALIB_SEED, help="calibration sample and fine-tuning seed")
    parser.add_argument("--eval-split", default="val", help="split to measure accuracy on (default val)")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="output folder (default runs/sweep-<model>[-ft<N>])")


def config_from_args(args: argparse.Namespace) -> tuple[SweepConfig, Path]:
    """A :class:`SweepConfig` and output folder from parsed ``sweep-sparsity`` arguments."""
    config = SweepConfig(
        model=args.model, methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        sparsities=parse_numbers(args.sparsities, "--sparsities"), finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        finetune_batch_size=args.finetune_batch_size, n_calib=args.n_calib, seed=args.seed,
        eval_split=args.eval_split, batch_size=args.batch_size, device=args.device,
    )
    suffix = f"-ft{config.finetune_epochs}" if config.finetune_epochs else ""
    name = Path(config.model).name or "model"  # an alias, or a saved model's folder name
    return config, Path(args.out) if args.out else Path("runs") / f"sweep-{name}{suffix}"


def main(args: argparse.Namespace) -> int:
    """Entry point of ``hooked-vit sweep-sparsity``: run the sweep, print the table and file paths."""
    config, out = config_from_args(args)
    start = time.perf_counter()
    rows = run_sweep(config, out)
    print(markdown_table(rows, tuple(sorted(set(config.sparsities)))))
    print(f"\n{time.perf_counter() - start:.0f} s; wrote {out}/sweep.csv, sweep.md, sweep.png, sweep.json")
    return 0
