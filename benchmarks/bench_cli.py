"""How fast ``hooked-vit`` answers ``--help``, ``SUBCOMMAND --help`` and a bad option (target: under
2 s each, i.e. no torch import), against two references measured in the same run: a bare Python
start (``python -c pass``) and ``python -c "import torch, timm, transformer_lens"`` (what every call
paid before the registry became lazy).

    python benchmarks/bench_cli.py [--repeats 3]

Prints one line per call: median wall seconds, the ratio to the bare start and to the heavy import,
and whether it meets the 2 s target. Exit code 1 if any call misses it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 2.0
ENTRY = "import sys; from hooked_vit.cli import main; sys.exit(main(sys.argv[1:]))"
SUBCOMMANDS = ("info", "train-default", "evaluate", "sweep-sparsity", "impact", "accuracy", "neuron", "layer",
               "circuit", "model")
BAD_OPTIONS = (
    ["train-default", "--epochs", "-1"],
    ["sweep-sparsity", "--sparsities", ""],
    ["layer", "--sweep-k", "abc"],
    ["neuron", "--finetune-epochs", "-1"],
    ["layer", "--sae.cache-dir", ""],
    ["circuit", "--steps", "0"],
)


def wall_seconds(argv: list[str], repeats: int) -> float:
    """Median wall-clock seconds of ``python argv`` (output discarded)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per call; the median is reported")
    args = parser.parse_args()

    bare = wall_seconds(["-c", "pass"], args.repeats)
    heavy = wall_seconds(["-c", "import torch, timm, transformer_lens"], args.repeats)
    print(f"reference: python -c pass {bare:.2f} s; import torch, timm, transformer_lens {heavy:.2f} s")
    calls = [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS] + [list(b) for b in BAD_OPTIONS]
    missed = 0
    print(f"{'call':<48} {'s':>6} {'x bare':>7} {'x heavy':>8}  < {TARGET_SECONDS:g} s")
    for call in calls:
        seconds = wall_seconds(["-c", ENTRY, *call], args.repeats)
        ok = seconds < TARGET_SECONDS
        missed += not ok
        label = "hooked-vit " + " ".join(repr(a) if not a else a for a in call)
        print(f"{label:<48} {seconds:6.2f} {seconds / bare:7.1f} {seconds / heavy:8.3f}  {'yes' if ok else 'NO'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
