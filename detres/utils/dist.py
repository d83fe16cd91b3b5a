"""Rank queries and object collectives that work with or without a torch.distributed process group.

Without a process group (a plain single-process run) every helper behaves as rank 0 of a world of
one, so library code can call them unconditionally. Joining a group is the engine's job
(:mod:`detres.engine.distributed`); this module sits on the bottom floor so that data, inference
and engine code can all ask "which rank am I?".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_gather_objects",
    "broadcast_object",
    "max_over_ranks",
    "finite_on_all_ranks",
    "shard_indices",
    "unshard",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that logs, writes files and saves checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (picklable objects; CPU tensors travel fine)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (the other ranks' argument is ignored)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks (every rank must call it at the same point): e.g. whether any rank
    received a stop signal, so that all stop at the same step."""
    if not is_distributed():
        return value
    import torch  # here, so the rank queries above need torch.distributed only

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
    flag = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def finite_on_all_ranks(value: float) -> bool:
    """Whether ``value`` (a loss) is finite on every rank: under torchrun all ranks then stop at the same step
    when one diverges, instead of the others waiting forever in the next gradient all-reduce."""
    return max_over_ranks(int(not math.isfinite(value))) == 0


def shard_indices(size: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The items of a ``size``-long dataset one rank handles: ``rank, rank + world, ...`` (strided, so
    ranks differ by at most one item and image sizes mix evenly)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return range(rank, size, world_size)


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of :func:`shard_indices`: the per-rank result lists (rank order) back in dataset order."""
    world = len(parts)
    total = sum(len(p) for p in parts)
    out: list[T] = []
    for i in range(total):
        part = parts[i % world]
        j = i // world
        if j >= len(part):
            raise ValueError(f"unshard: rank {i % world} returned {len(part)} results, expected more for {total} items")
        out.append(part[j])
    return out
