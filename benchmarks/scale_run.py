"""The scale run of issue 13: one forward+backward of the ``cpp`` backend at L=7, B=16384,
N=32768, D=384, dims 32..384 (fp32), beside ``torch.mm``'s rate on the same machine, in one
process. (The ``reference`` backend cannot run it: about 100 GB of score matrices.)

    PYTHONPATH=. python benchmarks/scale_run.py            # add --batch 2048 for a quick try

Prints one JSON object: time, peak extra memory (above the inputs, gradients included),
inputs, and GFLOP/s of both on the prefix-trick FLOP count 8 * L * B * N * D (forward one
product over D per layer; backward recomputes it, then the dQ and dK products). The
``torch.mm`` rate is the median of three [B, D] @ [D, 4096] sweeps over all N columns of one
layer (same FLOP per call shape as the kernel's, without a B x N output).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from memory import peak_extra_bytes

import m2d_kernels as m2d

DIMS = (32, 64, 128, 256, 384)
MM_COLUMNS = 4096


def mm_gflops(n_queries: int, n_docs: int, n_features: int, repeats: int = 3) -> float:
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(n_queries, n_features, generator=generator)
    docs_t = torch.randn(n_features, n_docs, generator=generator)
    out = torch.empty(n_queries, min(MM_COLUMNS, n_docs))
    times = []
    for _ in range(repeats + 1):  # the first sweep warms up
        start = time.perf_counter()
        for c0 in range(0, n_docs, MM_COLUMNS):
            block = docs_t[:, c0 : c0 + MM_COLUMNS]
            torch.mm(queries, block, out=out[:, : block.shape[1]])
        times.append(time.perf_counter() - start)
    return 2 * n_queries * n_docs * n_features / statistics.median(times[1:]) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--docs", type=int, help="N (default 2B)")
    parser.add_argument("--features", type=int, default=384)
    parser.add_argument("--backend", default="cpp")
    args = parser.parse_args(argv)
    n_layers, n_queries, n_features = args.layers, args.batch, args.features
    n_docs = args.docs or 2 * n_queries

    warm_q = torch.randn(1, 128, n_features, requires_grad=True)
    m2d.matryoshka_2d_infonce(warm_q, torch.randn(1, 256, n_features), DIMS, backend=args.backend).backward()
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(n_layers, n_queries, n_features, generator=generator).requires_grad_()
    docs = torch.randn(n_layers, n_docs, n_features, generator=generator).requires_grad_()
    elapsed = {}

    def step():
        start = time.perf_counter()
        loss = m2d.matryoshka_2d_infonce(queries, docs, DIMS, backend=args.backend)
        elapsed["forward_s"] = time.perf_counter() - start
        loss.backward()
        elapsed["total_s"] = time.perf_counter() - start

    peak = peak_extra_bytes(step, torch.device("cpu"))
    flop = 8 * n_layers * n_queries * n_docs * n_features
    mm_rate = mm_gflops(n_queries, n_docs, n_features)
    gflops = flop / elapsed["total_s"] / 1e9
    print(json.dumps(dict(
        backend=args.backend, L=n_layers, B=n_queries, N=n_docs, D=n_features, dims=list(DIMS), dtype="float32",
        threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
        forward_s=round(elapsed["forward_s"], 2), forward_backward_s=round(elapsed["total_s"], 2),
        peak_extra_bytes=peak, input_bytes=(queries.numel() + docs.numel()) * 4, prefix_trick_flop=flop,
        gflops=round(gflops, 1), torch_mm_gflops=round(mm_rate, 1), fraction_of_mm=round(gflops / mm_rate, 3),
    )))


if __name__ == "__main__":
    main()
