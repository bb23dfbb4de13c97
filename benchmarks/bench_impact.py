"""Time of each level of the study relative to one pass over its data, in one run.

Runs (or resumes) a study with ``--preset`` (default quick) into ``--out``, then for each level
times one plain forward pass of every variant over the images that level reads (accuracy and
neuron: the val split; layer: the train split the SAEs learn from; circuit: the train and val
splits; model: the selected images) and prints level wall time / that pass. A level resumed from
saved units shows its last run's time (use a fresh ``--out`` for a full measurement; an empty
``$HOOKED_VIT_CACHE`` to include building the variants, which the accuracy level does first).

Usage: python benchmarks/bench_impact.py [--preset quick] [--out runs/bench-impact] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from analyses.common.variants import load_model
from analyses.impact import preset, run
from analyses.common.level import DONE_FILE
from analyses.impact.report import level_dir
from analyses.model.compute import select_images
from hooked_vit.data import load_dataset
from hooked_vit.evaluation import evaluate


def level_images(name: str, config, model) -> list:
    """The datasets level ``name`` reads (one pass over each is the reference)."""
    if name in ("accuracy", "neuron"):
        return [load_dataset(config.data, split=config.split, model=model)]
    if name == "layer":
        return [load_dataset(config.data, split=config.train_split, model=model)]
    if name == "circuit":
        return [load_dataset(config.data, split=s, model=model) for s in (config.train_split, config.val_split)]
    return [select_images(load_dataset(config.data, split=config.split, model=model), config)]


def one_pass(config, name: str) -> tuple[float, int]:
    """Seconds of one forward pass of every variant over the level's images, and the image count."""
    seconds, images = 0.0, 0
    for sparsity in config.sparsities:
        model = load_model(config, float(sparsity))
        for data in level_images(name, config, model):
            start = time.perf_counter()
            evaluate(model, data, progress=False)
            seconds += time.perf_counter() - start
            images += len(data)
    return seconds, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=("quick", "full", "paper"))
    parser.add_argument("--data", default=None, help="dataset (the paper preset needs an ImageNet folder)")
    parser.add_argument("--out", default="runs/bench-impact")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    config = preset(args.preset, device=args.device, **({"data": args.data} if args.data else {}))
    start = time.perf_counter()
    run(config, args.out, show_progress=False)
    total = time.perf_counter() - start
    print(f"\nstudy: {total:.0f} s ({args.preset} preset, {config.model}, {len(config.sparsities)} models)\n")
    print("| Level | Wall time (s) | One pass over its data (s, images) | Ratio |")
    print("|---|---:|---:|---:|")
    for name in config.levels:
        method = config.methods[0]
        done = json.loads((level_dir(Path(args.out), name, method) / DONE_FILE).read_text())
        seconds, images = one_pass(config.level_config(name, method), name)
        print(f"| {name} | {done['seconds']:.1f} | {seconds:.2f} ({images}) | {done['seconds'] / seconds:.0f} |")


if __name__ == "__main__":
    main()
