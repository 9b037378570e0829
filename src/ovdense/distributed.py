"""Process and data-loader plumbing shared by evaluation and training: torchrun groups, sharding, workers.

Nothing here knows about benchmarks or objectives; ``ovdense.eval`` and ``ovdense.train`` both build on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import OvdenseError

__all__ = [
    "DistInfo",
    "dist_info",
    "identity_collate",
    "init_distributed_from_env",
    "shard_indices",
    "sum_over_processes",
    "unwrap_worker_errors",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size of the current ``torch.distributed`` group (torchrun), or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed_from_env(device: str | None) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for a single process).

    Uses NCCL when the processes run on CUDA, gloo on CPU.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist_info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist_info()


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ``torch.distributed`` group (torchrun), on the CPU; ``t`` itself when there is none.

    NCCL reduces CUDA tensors only (on this process's current device), gloo CPU ones.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    moved = t.to(device)
    dist.all_reduce(moved)
    return moved.cpu()


def shard_indices(n: int, limit: int | None, info: DistInfo) -> list[int]:
    """Image indices this process evaluates: the first ``limit`` images, every ``world_size``-th from ``rank``."""
    total = n if limit is None else min(n, limit)
    return list(range(info.rank, total, info.world_size))


def identity_collate(batch):
    """DataLoader ``collate_fn`` for batch size 1: the one sample as it is (images differ in size)."""
    return batch[0]


def unwrap_worker_errors(samples):
    """Iterate, turning an OvdenseError raised in a DataLoader worker back into its one-line message.

    The loader re-raises a worker's exception with the worker's traceback folded into the message.
    """
    try:
        yield from samples
    except OvdenseError as err:
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        if len(lines) <= 1:
            raise
        last = lines[-1]
        prefix = "ovdense.errors.OvdenseError: "
        raise OvdenseError(last[len(prefix) :] if last.startswith(prefix) else last) from None
