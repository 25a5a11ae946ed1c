"""Time and peak extra memory of one forward+backward against the batch size, one process per case.

Peak memory is a process-wide high-water mark (memory.py), so each (backend, B) case runs
in a fresh interpreter: nothing a previous case allocated or cached can hide in, or add
to, its figure. Inputs are fp32, N = 2B (one hard negative per query), dims 32..D.

    python benchmarks/memory_scaling.py --backend cpp torch --batch 1024 2048 4096 8192 16384
    python benchmarks/memory_scaling.py --directions query_to_doc query_to_query doc_to_query doc_to_doc ...

prints one JSON object per case: ``peak_extra_bytes`` (above the inputs, gradients
included), ``input_bytes``, ``times_s``. ``test_bench_memory_scaling.py`` runs the same
cases under pytest-benchmark; ``plot_memory_scaling.py`` draws them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIMS = (32, 64, 128, 256, 384)


def measure(backend: str, n_layers: int, n_queries: int, n_docs: int, n_features: int, dims, reps: int,
            directions=("query_to_doc",)) -> dict:
    """Runs in this process: warm-up on a small problem, then one measured call and `reps` timed calls of the
    loss over ``directions`` (joint partition)."""
    import torch
    from memory import peak_extra_bytes

    import m2d_kernels as m2d

    def inputs(b, n):
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(n_layers, b, n_features, generator=generator).requires_grad_()
        k = torch.randn(n_layers, n, n_features, generator=generator).requires_grad_()
        return q, k

    def step(q, k):
        q.grad = k.grad = None
        m2d.matryoshka_2d_infonce(q, k, dims, backend=backend, directions=tuple(directions)).backward()

    step(*inputs(128, 256))  # extension load, thread pools, BLAS buffers: not the call's memory
    queries, docs = inputs(n_queries, n_docs)
    peak = peak_extra_bytes(lambda: step(queries, docs), torch.device("cpu"))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(queries, docs)
        times.append(time.perf_counter() - start)
    return dict(
        backend=backend,
        L=n_layers,
        B=n_queries,
        N=n_docs,
        D=n_features,
        dims=list(dims),
        directions=list(directions),
        threads=torch.get_num_threads(),
        input_bytes=(queries.numel() + docs.numel()) * queries.element_size(),
        peak_extra_bytes=peak,
        times_s=times,
    )


def measure_in_fresh_process(backend, n_layers, n_queries, n_docs, n_features, dims, reps,
                             directions=("query_to_doc",)) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--in-process", "--backend", backend, "--layers",
               str(n_layers), "--batch", str(n_queries), "--docs", str(n_docs), "--features", str(n_features),
               "--dims", *map(str, dims), "--reps", str(reps), "--directions", *directions]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", nargs="+", default=["cpp", "torch"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--docs", type=int, help="N (default 2B)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--dims", nargs="+", type=int, default=list(DEFAULT_DIMS))
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--directions", nargs="+", default=["query_to_doc"],
                        help="MultipleNegativesRankingLoss directions (joint partition)")
    parser.add_argument("--in-process", action="store_true", help="measure here (one case) instead of in a child")
    args = parser.parse_args(argv)
    for backend in args.backend:
        for n_queries in args.batch:
            case = (backend, args.layers, n_queries, args.docs or 2 * n_queries, args.features, tuple(args.dims),
                    args.reps, tuple(args.directions))
            row = measure(*case) if args.in_process else measure_in_fresh_process(*case)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
