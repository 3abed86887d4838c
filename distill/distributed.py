"""Process-group helpers for DistributedDataParallel training under ``torchrun``.

Thin wrappers over :mod:`torch.distributed` (architecture.md: nothing home-made replaces it), so
the trainer reads the same in one process and in many: with no process group every helper is the
single-process identity (rank 0 of 1, barriers and reductions do nothing).

``torchrun`` describes each process through the ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE`` environment variables; :func:`init` reads them and joins the group with
NCCL on CUDA and gloo on CPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it (0 when not launched by it); unlike
    :func:`rank` it holds before the group is joined and after it is left."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes sharing this machine (they share its CPU cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def init(device: torch.device) -> bool:
    """Join the ``torchrun`` process group for ``device``; True if this call created it.

    A group the caller already initialised (e.g. ``torch.multiprocessing.spawn``) is reused and
    left to the caller to destroy.
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """:func:`init` on entry and, if it created the group, :func:`cleanup` on exit."""
    owns = init(device)
    try:
        yield
    finally:
        if owns:
            cleanup()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, indexed by rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
