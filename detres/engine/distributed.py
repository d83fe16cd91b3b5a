"""Data-parallel training under torchrun: the process group from the environment, DDP wrapping, rank-0 set-up.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per CPU worker) and
describes the job in environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. Without them (``WORLD_SIZE`` unset or 1) nothing here changes a run: no process group,
no DDP wrapper, rank 0 of a world of one. With them, the trainers join the group (NCCL on CUDA, gloo on
CPU), wrap the model in DistributedDataParallel (gradients averaged over ranks every step), split every
global batch over the ranks (:class:`detres.data.samplers.RankSlicedBatchSampler`) and leave logging,
files and checkpoints to rank 0.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detres.config.load import Config
from detres.data.samplers import RankSlicedBatchSampler
from detres.engine.run.setup import RunStart, TrainingInterrupted, resolve_device, run_guard, start_run
from detres.engine.seeded_data import seed_everything
from detres.models.detection.roi_heads import BoxHead
from detres.utils.dist import (
    all_gather_objects,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
)

T = TypeVar("T")

__all__ = [
    "ENV_KEYS",
    "env_world_size",
    "init_distributed",
    "start_distributed_run",
    "distributed_run_guard",
    "on_main",
    "wrap_ddp",
    "MethodCall",
    "shard_batches",
    "sum_over_ranks",
    "mean_over_ranks",
    "cleanup",
    "is_distributed",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_gather_objects",
    "broadcast_object",
]

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r}: expected an integer (set by torchrun)") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset: a plain single-process run)."""
    return _env_int("WORLD_SIZE", 1)


def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group when the environment describes one; returns this rank's device.

    ``device``: the configured device (``resolve_device(cfg.device)``); CUDA becomes ``cuda:LOCAL_RANK``
    and picks the NCCL backend, anything else gloo. Idempotent; a no-op for a world of one.
    """
    world = env_world_size()
    if world <= 1 and not dist.is_initialized():
        return device
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                f"device(s): start at most that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [key for key in ENV_KEYS if key not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world} but the environment lacks {missing}: start the tool with "
                f"torchrun (python -m torch.distributed.run), which sets them"
            )
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
        atexit.register(cleanup)
    return device


def cleanup() -> None:
    """Leave the process group (at exit; harmless when there is none). Garbage that still holds the group (a DDP
    wrapper's reducer: DDP refers to itself, so only the collector frees it) is freed first: a group that
    outlives its destruction keeps gloo's worker threads running into interpreter shutdown, which aborts."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn`` on rank 0 only, the other ranks waiting; an exception on rank 0 is raised on every rank
    (so a bad config fails every process with the same one-line message). Returns ``fn``'s result on
    rank 0 and None elsewhere."""
    if not is_distributed():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    shared = broadcast_object(error)
    if shared is not None:
        raise (error if error is not None else shared)
    return result


def start_distributed_run(cfg: Config, **kwargs: Any) -> RunStart:
    """:func:`detres.engine.run.setup.start_run` (same arguments, same result) for any world size: rank 0 alone
    prepares the folder (resume guard, checkpoint choice, ``config.yaml``) and its result, the resumed
    checkpoint included, is sent to every rank, so all ranks start from the same weights without reading
    rank 0's disk; each rank gets its own device (``cuda:LOCAL_RANK``) and the same seeds.
    """
    if env_world_size() <= 1 and not is_distributed():
        return start_run(cfg, **kwargs)
    device = init_distributed(resolve_device(cfg.device))
    result = broadcast_object(on_main(start_run, cfg, **kwargs))
    seed_everything(cfg.seed)  # rank 0 was seeded inside start_run
    return dataclasses.replace(result, device=device)  # a RunStart, on this rank's device


@contextmanager
def distributed_run_guard(cfg: Config) -> Iterator[None]:
    """:func:`detres.engine.run.setup.run_guard` for any world size: every rank handles the stop signals (they
    agree on the step to stop at), rank 0 alone holds the folder's lock. Joins the process group first, so a
    lock held by another run fails rank 0 and torchrun then stops the rest.

    A stop that every rank makes at the same step (a stop signal, a non-finite loss: both checks are
    collective) ends the other ranks' runs quietly (the training function returns None there): rank 0
    reports it and saves or rewinds the checkpoints, and torchrun, which stops every process as soon as one
    fails, must not kill rank 0 half-way through that.
    """
    if env_world_size() > 1 or is_distributed():
        init_distributed(resolve_device(cfg.device))
    try:
        with run_guard(cfg.output_dir, lock=is_main_process()):
            yield
    except (FloatingPointError, TrainingInterrupted):
        if is_main_process() or not is_distributed():
            raise


def wrap_ddp(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when running distributed (otherwise ``model`` itself).

    Call the wrapper for the training forward pass (its backward averages the gradients over the ranks);
    keep using ``model`` for everything else (state_dict, evaluation, attribute access).
    ``find_unused_parameters``: only where a step leaves trainable parameters unused (it costs a graph walk).
    """
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    if device.type == "cpu":
        _match_box_head_gradient_layout(model)
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def _match_box_head_gradient_layout(model: nn.Module) -> None:
    """On a CPU the box head runs conv5 channels-last, so its weight gradients come out channels-last; DDP
    copies (and warns about) every gradient whose strides differ from its bucket view, which follows the
    parameter: give those weights the same layout (values unchanged)."""
    for module in model.modules():
        if isinstance(module, BoxHead):
            module.to(memory_format=torch.channels_last)


class MethodCall(nn.Module):
    """Calls a named method of ``model`` from ``forward``, so that DDP (which hooks ``forward`` only) syncs the
    gradients of loss methods such as ``rpn_losses`` / ``detector_losses``: ``wrap_ddp(MethodCall(m), device)
    ("rpn_losses", images, targets, sizes)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, method)(*args, **kwargs)


def shard_batches(batch_sampler: Iterable[list[Any]]) -> Iterable[list[Any]]:
    """This rank's slice of every global batch (``batch_sampler`` itself in a single process)."""
    if not is_distributed():
        return batch_sampler
    return RankSlicedBatchSampler(batch_sampler, get_rank(), get_world_size())


def sum_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (e.g. error counts of sharded evaluation; a collective call)."""
    if not is_distributed():
        return dict(values)
    gathered = all_gather_objects(dict(values))
    return {key: sum(g[key] for g in gathered) for key in values}


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank must call it at the same point; equal shard sizes,
    so the mean of the ranks' means is the mean over the global batch)."""
    totals = sum_over_ranks(values)
    return {key: total / get_world_size() for key, total in totals.items()}
