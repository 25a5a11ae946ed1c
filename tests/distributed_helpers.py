"""Starting gloo process groups on the CPU for the multi-process tests."""

from __future__ import annotations

import datetime
import importlib
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=120)  # a failing rank must not leave the others waiting for 30 minutes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, world_size: int, *args) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` processes and wait for all of them."""
    # fork: the children start in a second instead of importing torch again (they use one thread, no CUDA).
    # The functional collectives import torch._dynamo on first use (seconds); import it once, before forking.
    importlib.import_module("torch._dynamo")
    mp.start_processes(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True,
                       start_method="fork")


def init_process_group(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=TIMEOUT)
