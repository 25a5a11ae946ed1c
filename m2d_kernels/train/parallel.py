"""Data-parallel training under torchrun: the process group, this process's place and device.

``torchrun --nproc_per_node W -m m2d_kernels.train ...`` starts ``W`` processes with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set. :func:`start` joins them into one process
group (NCCL on CUDA, gloo on the CPU) and gives each its own GPU; without ``WORLD_SIZE > 1``
it is a no-op and the run is the single-process one.

Every global batch of ``B`` examples is split into ``W`` contiguous slices of ``B / W``
(:func:`shard`); with the loss's ``gather_across_devices`` the candidates of all ranks are
laid out exactly as one process lays out the whole batch, so one DDP step equals one
single-process step on the same global batch (see ``m2d_kernels/distributed.py``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from m2d_kernels.train.errors import ConfigError

Item = TypeVar("Item")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process without DDP)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available, else the CPU; under DDP ``auto`` and ``cuda`` mean this
    process's own GPU, ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:<index>, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu, cuda or cuda:<index>, got {name!r} (the loop runs on those)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def start(device: str = "auto") -> tuple[World, torch.device]:
    """Join the process group torchrun describes (once; later calls reuse it).

    Returns this process's :class:`World` and device. Without an initialised group and
    without ``WORLD_SIZE > 1`` in the environment: ``World()`` and ``resolve_device(device)``.
    """
    if not _initialised() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(), resolve_device(device)
    rank = dist.get_rank() if _initialised() else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # NCCL and the object collectives use the current device
    if not _initialised():
        if resolved.type == "cuda":
            dist.init_process_group("nccl", device_id=resolved)
        else:
            dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size()), resolved


def stop() -> None:
    """Leave the process group; call it once the DDP model is gone.

    A gloo group freed later, by the destructor of DDP's reducer, can hang the process at
    exit; collecting the model's reference cycles first lets the group go here.
    """
    if _initialised():
        gc.collect()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (e.g. while rank 0 writes or evaluates); nothing in one process."""
    if world.is_distributed:
        dist.barrier()


def shard(batch: Sequence[Item], world: World) -> list[Item]:
    """This rank's contiguous slice of a global batch (its length a multiple of the world size)."""
    size = len(batch) // world.world_size
    return list(batch[world.rank * size:(world.rank + 1) * size])


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``value`` over all ranks (a collective: every rank must call it)."""
    if not world.is_distributed:
        return value
    total = value.clone()
    dist.all_reduce(total)  # gloo has no ReduceOp.AVG
    return total / world.world_size


def gather_to_main(value: object, world: World) -> list[object] | None:
    """Every rank's ``value`` on rank 0 (in rank order), None elsewhere; ``[value]`` in one process."""
    if not world.is_distributed:
        return [value]
    gathered = [None] * world.world_size if world.is_main_process else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value: Item, world: World) -> Item:
    """Rank 0's ``value`` on every rank."""
    if not world.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
