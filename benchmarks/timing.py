"""Wall-clock timing shared by the benchmark scripts (imported as ``timing`` when a script runs as
``python benchmarks/bench_*.py``), and the ``--system-malloc`` option of the CPU-heavy ones. Times
are seconds; CUDA work is synchronised around each call."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hooked_vit.cpu_memory import retain_freed_memory


def sync(device: str) -> None:
    """Wait for queued CUDA work on a CUDA ``device``; nothing elsewhere."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], Any]], device: str, repeats: int,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each function over ``repeats`` rounds after ``warmup`` rounds; the
    functions alternate within a round, so load from elsewhere on the machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after one warm-up, and its output."""
    times, out = [], None
    for round_ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        if round_:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    """``--system-malloc``: measure with glibc's default malloc rather than as ``hooked-vit`` runs."""
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (the hooked-vit command retains freed memory)")


def apply_malloc_option(args: argparse.Namespace) -> str:
    """Retain freed memory as the ``hooked-vit`` command does, unless ``--system-malloc``; returns
    the setting in force, for the printout."""
    return "retains freed memory" if not args.system_malloc and retain_freed_memory() else "system default"
