"""CPU backends side by side while other processes keep the cores busy (issue 18).

Starts ``--busy`` processes that spin on a core each (as data-loader workers or another job
would), then times forward+backward of each backend in turn, round-robin, and prints the
medians as JSON. The busy processes are stopped at the end.

    PYTHONPATH=. python benchmarks/under_load.py --busy 2 --batch 256 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import m2d_kernels as m2d

DIMS = (32, 64, 128, 256, 384)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="background processes spinning on a core each")
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", nargs="+", default=["cpp", "torch", "reference"])
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(args.layers, args.batch, args.features, generator=generator).requires_grad_()
    docs = torch.randn(args.layers, 2 * args.batch, args.features, generator=generator).requires_grad_()

    def step(backend):
        queries.grad = docs.grad = None
        start = time.perf_counter()
        m2d.matryoshka_2d_infonce(queries, docs, DIMS, backend=backend).backward()
        return time.perf_counter() - start

    for backend in args.backend:
        step(backend)  # warm-up, extension load
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        times = {backend: [] for backend in args.backend}
        for _ in range(args.rounds):
            for backend in args.backend:
                times[backend].append(step(backend))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    medians = {backend: statistics.median(t) for backend, t in times.items()}
    print(json.dumps(dict(
        L=args.layers, B=args.batch, N=2 * args.batch, D=args.features, busy_processes=args.busy,
        threads=torch.get_num_threads(), rounds=args.rounds,
        median_ms={b: round(m * 1e3, 1) for b, m in medians.items()},
        range_ms={b: [round(min(t) * 1e3, 1), round(max(t) * 1e3, 1)] for b, t in times.items()},
    )))


if __name__ == "__main__":
    main()
