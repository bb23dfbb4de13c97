"""Cost of Wanda pruning relative to one plain forward pass over the same calibration images.

    python benchmarks/bench_prune.py [--model deit3_base] [--n-calib 64] [--batch-size 16] [--device cpu|cuda]

The model is the alias's architecture with random weights (``pretrained=False, seed``); images are
standard-normal tensors. Each measurement runs in its own fresh process after a one-image warm-up.
Peak memory is the increase over the memory in use just before the measurement: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs``; where that is not allowed, the ``ru_maxrss`` increase, a lower
bound).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hooked_vit import HookedViT
from hooked_vit.pruning import prune


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _can_reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(seconds, peak extra memory in MiB)`` of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if _can_reset_hwm():
        base = _status_kib("VmRSS")
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        return seconds, (_status_kib("VmHWM") - base) / 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def run_one(args: argparse.Namespace) -> dict[str, float]:
    """Build the model and images, warm up, and measure ``args.measure`` (forward or prune)."""
    device = torch.device(args.device)
    model = HookedViT.from_pretrained(args.model, pretrained=False, seed=args.seed, device=device)
    images = torch.randn(args.n_calib, 3, model.cfg.img_size, model.cfg.img_size,
                         generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.no_grad():
        model(images[:1])  # warm-up: kernels, thread pools, allocator

    def forward() -> None:
        with torch.no_grad():
            for batch in images.split(args.batch_size):
                model(batch)

    def run_prune() -> None:
        prune(model, "wanda", args.sparsity, calibration=images, batch_size=args.batch_size)

    seconds, mib = measure(forward if args.measure == "forward" else run_prune, device)
    return {"seconds": seconds, "mib": mib, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit3_base")
    parser.add_argument("--n-calib", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", choices=("forward", "prune"), default=None,
                        help="internal: measure one of them in this process and print JSON")
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(run_one(args)))
        return
    # Each measurement runs in a fresh process, so neither inherits the other's allocator state.
    results = {}
    for what in ("forward", "prune"):
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--measure", what]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[what] = json.loads(out.strip().splitlines()[-1])
    device = torch.device(args.device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or 'CPU'}, {results['prune']['threads']} threads"
    fwd, prn = results["forward"], results["prune"]
    print(f"Wanda {args.sparsity:g} on {args.model} (random init), {args.n_calib} images, "
          f"batch {args.batch_size}, {where}")
    print(f"{'':<22}{'seconds':>10}{'peak MiB':>12}")
    print(f"{'forward pass':<22}{fwd['seconds']:>10.2f}{fwd['mib']:>12.1f}")
    print(f"{'prune()':<22}{prn['seconds']:>10.2f}{prn['mib']:>12.1f}")
    print(f"{'ratio prune/forward':<22}{prn['seconds'] / fwd['seconds']:>10.2f}"
          f"{prn['mib'] / max(fwd['mib'], 1e-9):>12.2f}")


if __name__ == "__main__":
    main()
