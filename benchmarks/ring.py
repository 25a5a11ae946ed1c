"""Ring exchange vs all-gather: step time and peak memory per rank, W gloo processes on one machine.

    PYTHONPATH=$PWD python benchmarks/ring.py --world-sizes 2 4 --backend torch

Each rank runs one forward + backward of ``matryoshka_2d_infonce`` on its own ``[L, B, D]``
queries and ``[L, N, D]`` docs with ``gather_across_devices="all_gather"`` and ``"ring"``
alternately (side by side, so both see the same machine load); the step time is the slowest
rank's, median over ``--repeats``. Also measured: one block's compute alone (the pass API,
forward + backward, no communication) and one block's transfer alone (an isend/irecv of
``L * N * D`` elements to the neighbour), the two terms of the rule in docs/multi-device.md. Peak
memory per rank is the peak of the profiler's CPU allocation total (as ``tests/test_ring.py``).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from distributed_helpers import init_process_group, spawn  # noqa: E402
from test_ring import _peak_tensor_bytes  # noqa: E402

import m2d_kernels as m2d  # noqa: E402
from m2d_kernels import backends  # noqa: E402
from m2d_kernels.distributed import _Ring  # noqa: E402


def _timed(fn, group_barrier=True) -> float:
    if group_barrier:
        dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _worker(rank: int, world_size: int, port: int, args, out_dir: str) -> None:
    init_process_group(rank, world_size, port)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(rank)
    queries = torch.randn(args.layers, args.batch, args.features, generator=generator).to(dtype).requires_grad_()
    docs = torch.randn(args.layers, args.docs, args.features, generator=generator).to(dtype).requires_grad_()
    dims = tuple(args.dims)

    def step(mode):
        def run():
            queries.grad = docs.grad = None
            m2d.matryoshka_2d_infonce(queries, docs, dims, backend=args.backend, symmetric=args.symmetric,
                                      gather_across_devices=mode).backward()
        return run

    impl = backends.resolve(args.backend, queries.device, dtype)
    active = ((True,) * len(dims),) * args.layers
    rows, block = queries.detach(), docs.detach()
    positives = torch.arange(args.batch)

    def block_compute():
        stats = impl.row_statistics(rows, block, dims, active, 20.0, positives)
        impl.pass_gradients(rows, block, dims, active, 20.0, positives, stats.rows,
                            torch.ones(args.layers, len(dims), dtype=stats.rows.offset.dtype))

    ring = _Ring(dist.group.WORLD)
    incoming = torch.empty_like(block)

    def block_transfer():
        for request in ring.exchange(block, incoming, 0):
            request.wait()

    times = {"all_gather": [], "ring": [], "block_compute": [], "block_transfer": []}
    for mode in ("all_gather", "ring"):
        step(mode)()  # warm-up: lazy imports and initialisation
    for _ in range(args.repeats):
        for name, fn in (("all_gather", step("all_gather")), ("ring", step("ring")), ("block_compute", block_compute),
                         ("block_transfer", block_transfer)):
            times[name].append(_timed(fn))
    peaks = {mode: _peak_tensor_bytes(step(mode)) for mode in ("all_gather", "ring")}
    if rank == 0:
        result = {name: statistics.median(values) for name, values in times.items()}
        torch.save({"median_s": result, "peak_bytes_rank0": peaks}, os.path.join(out_dir, "result.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--docs", type=int, default=128, help="N per rank (a multiple of --batch)")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    report = {"config": vars(args), "cpu": _cpu_name(), "threads_per_rank": 1, "results": {}}
    for world_size in args.world_sizes:
        with tempfile.TemporaryDirectory() as out_dir:
            spawn(_worker, world_size, args, out_dir)
            report["results"][world_size] = torch.load(Path(out_dir) / "result.pt")
    block_bytes = args.layers * args.docs * args.features * torch.finfo(getattr(torch, args.dtype)).bits // 8
    report["block_bytes"] = block_bytes
    report["block_flops_forward"] = 2 * args.layers * args.batch * args.docs * args.features
    print(json.dumps(report, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
