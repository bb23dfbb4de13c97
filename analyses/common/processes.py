"""Spreading a level or a study over processes with torch.distributed (``torchrun``: NCCL on GPUs, gloo on CPU).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process joins one process group;
each takes its :class:`~analyses.common.units.Shard` of every level's units and writes them into
the shared output folder (one file per unit, written atomically, so processes never clobber each
other); :func:`barrier` waits for all before rank 0 assembles a level and writes the report.
Without ``torchrun`` everything runs in this one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from analyses.common.units import Shard

# How long a barrier waits for the slowest process (a level's share can take hours on big runs).
TIMEOUT_ENV = "HOOKED_VIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 48 * 3600


@dataclass(frozen=True)
class Processes:
    """This process's place among the study's processes."""

    shard: Shard
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    def device(self, requested: str | None) -> str | None:
        """``requested``, else this process's own GPU under torchrun (``cuda:<local rank>``), else the default."""
        import torch

        if requested is None and self.shard.world > 1 and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for one process)."""
        if self.shard.world > 1:
            import torch.distributed as dist

            dist.barrier()


def start() -> Processes:
    """Join the torchrun process group if this process was launched by torchrun (NCCL when CUDA is
    available, else gloo); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(Shard())
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend=backend, timeout=timeout)
    return Processes(Shard(dist.get_rank(), dist.get_world_size()), local_rank)


def stop(processes: Processes) -> None:
    """Leave the process group (after a last barrier)."""
    if processes.shard.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
