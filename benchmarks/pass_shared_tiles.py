"""Shared-tile passes (rules.triangle, rules.column_statistics) against the passes they replace, fwd + bwd.

    python benchmarks/pass_shared_tiles.py [--backend torch] [--repeats 7] [--queries 512] [--threads T]

One pass's ``row_statistics`` + ``pass_gradients``, fp32, L = 4, B = 512 queries, N = 2B documents,
D = 384, dims 32..384, cos, scale 20; the cases run round-robin (side by side) and the medians print:

    qq_self        Q vs Q, own row excluded (query_to_query today)
    qq_triangle    Q vs Q, triangle, column_statistics = B (query_to_query's two halves in one pass)
    qd_plain       Q vs D_all (query_to_doc today)
    qd_columns     Q vs D_all, column_statistics = B (query_to_doc + doc_to_query's statistics)
    dd_own         D+ vs D_all, own group excluded (doc_to_doc today; D+ = the first B docs)
    dd_triangle    D+ vs D_all, triangle, column_statistics = B, own group excluded
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from m2d_kernels.backends import resolve
from m2d_kernels.rules import PLAIN, Rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_layers, n_features, dims, scale = 4, 384, (32, 64, 128, 256, 384), 20.0
    n_queries, n_docs = args.queries, 2 * args.queries
    backend = resolve(args.backend, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(n_layers, n_queries, n_features, generator=generator)
    docs = torch.randn(n_layers, n_docs, n_features, generator=generator)
    active = ((True,) * len(dims),) * n_layers
    coef = torch.full((n_layers, len(dims)), 1.0 / n_queries)
    group = dict(group_period=n_queries, row_group=torch.arange(n_queries))
    cases = {
        "qq_self": (queries, queries, torch.full((n_queries,), -1), Rules(exclude_own_group=True, **group)),
        "qq_triangle": (queries, queries, torch.full((n_queries,), -1),
                        Rules(triangle=True, column_statistics=n_queries)),
        "qd_plain": (queries, docs, torch.arange(n_queries), PLAIN),
        "qd_columns": (queries, docs, torch.arange(n_queries), Rules(column_statistics=n_queries)),
        "dd_own": (docs[:, :n_queries], docs, torch.full((n_queries,), -1), Rules(exclude_own_group=True, **group)),
        "dd_triangle": (docs[:, :n_queries], docs, torch.full((n_queries,), -1),
                        Rules(triangle=True, column_statistics=n_queries, exclude_own_group=True, **group)),
    }

    def step(rows, cols, positives, rules):
        stats = backend.row_statistics(rows, cols, dims, active, scale, positives, rules)
        backend.pass_gradients(rows, cols, dims, active, scale, positives, stats.rows, coef, rules,
                               columns=stats.columns)

    times = {name: [] for name in cases}
    for case in cases.values():  # warm-up
        step(*case)
    for _ in range(args.repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            step(*case)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"backend {args.backend}, B={n_queries}, N={n_docs}, torch threads {torch.get_num_threads()}, "
          f"wall-clock medians of {args.repeats}")
    for name, median in medians.items():
        base = medians[{"qq": "qq_self", "qd": "qd_plain", "dd": "dd_own"}[name[:2]]]
        print(f"  {name:12s} {median * 1e3:8.1f} ms  {median / base:5.2f}x")


if __name__ == "__main__":
    main()
