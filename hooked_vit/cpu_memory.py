"""Large CPU tensors without page faults: glibc ``malloc`` tuned to keep freed memory for reuse.

On CPU, torch takes every tensor from ``malloc``. glibc serves a request above its mmap threshold
(adaptive, at most 32 MiB) with a fresh ``mmap`` and returns it to the system on ``free``, so each
large activation of a big batch (``[32, 197, 3072]`` float32 is 77 MB) faults its pages in again,
on every forward and backward. Element-wise work then runs several times slower per image at batch
32 than at batch 8 on deit3_base (measured: the batched circuit masks of ``bench_circuits.py`` went
from 1.23x to 1.0x the per-class time of one class at a time with this setting).

:func:`retain_freed_memory` raises both thresholds so that freed blocks stay in the heap and are
reused. The cost: the process keeps its peak memory until it exits. The ``hooked-vit`` command and
the benchmarks call it; in a notebook on CPU call it once, or start Python with
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 2**30  # bytes: blocks below 1 GiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept rather than given back (mallopt takes an int)


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); process-wide and
    idempotent. Returns whether it took effect: ``False`` off Linux or without glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["retain_freed_memory"]
