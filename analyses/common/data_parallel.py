"""Data-parallel training under ``torchrun``, shared by the levels that train dictionaries
(``transcoders``, ``replacement``): every process streams its own share of the activations and the
processes average their gradients after each backward (one ``all_reduce`` of the flattened
gradients, as DDP does), so every process holds the same weights; statistics such as which latents
fired are combined the same way. One process (``world == 1``) does nothing extra; the process group is
the one :func:`analyses.common.processes.start` joins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from hooked_vit.errors import check


@dataclass(frozen=True)
class DataParallel:
    """Process ``rank`` of ``world`` training one model (dictionary) together."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the checkpoints and the final files (rank 0)."""
        return self.rank == 0

    @classmethod
    def start(cls, enabled: bool | None = None) -> DataParallel:
        """The processes of this ``torchrun`` (joining its process group) when ``enabled`` (``None``:
        whenever launched by ``torchrun`` with more than one process), else this process alone."""
        import os

        from analyses.common.processes import start

        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        check(not enabled or launched, "distributed=True needs several processes: launch with torchrun "
                                       "--nproc-per-node N (N > 1), or pass distributed=False")
        if not (launched if enabled is None else enabled):
            return cls()
        shard = start().shard
        return cls(shard.rank, shard.world)

    def mean_(self, tensors: Iterable[Tensor]) -> None:
        """Replace each tensor (in place) by its mean over the processes."""
        tensors = list(tensors)
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def mean_gradients_(self, parameters: Iterable[nn.Parameter]) -> None:
        """Average the gradients of the trainable ``parameters`` over the processes (a parameter
        without a gradient on this process counts as a zero gradient)."""
        if self.world == 1:
            return
        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.mean_(p.grad for p in params)

    def any_(self, mask: Bool[Tensor, "*shape"]) -> Bool[Tensor, "*shape"]:
        """``mask`` or-ed over the processes."""
        if self.world == 1:
            return mask
        import torch.distributed as dist

        counts = mask.to(torch.int32)
        dist.all_reduce(counts)
        return counts > 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


__all__ = ["DataParallel"]
