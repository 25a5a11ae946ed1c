"""One pass (forward + backward) of a backend with and without the shared-tile rules, side by side.

    python benchmarks/shared_tiles_pass.py [backend] [reps] [threads]      (default: cpp 7, torch's threads)

Q vs Q (query_to_query: self excluded) against the triangle with column_statistics = B, Q vs D_all
(query_to_doc) against the same pass with column_statistics = B, and D+ vs D_all (doc_to_doc: own group
excluded; D+ = the first B docs) against the triangle with column_statistics = B; L = 4, B = 512, N = 1024, D = 384,
dims 32..384, fp32. The cases alternate within each repetition, so a loaded machine slows them alike;
prints each case's median wall and process CPU time and their ratios to the pass each replaces (on a
shared machine, CPU time with one thread is the steadier measure of work).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from m2d_kernels import backends
from m2d_kernels.rules import Rules

L, B, N, D, DIMS = 4, 512, 1024, 384, (32, 64, 128, 256, 384)


def _step(backend, rows, cols, positives, rules):
    active = ((True,) * len(DIMS),) * L
    coef = torch.full((L, len(DIMS)), 1.0 / B)
    stats = backend.row_statistics(rows, cols, DIMS, active, 20.0, positives, rules)
    columns = dict(col_offset=stats[3], col_log_sum=stats[4]) if rules.column_statistics else {}
    backend.pass_gradients(rows, cols, DIMS, active, 20.0, positives, stats[0], stats[1], coef, rules, **columns)


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "cpp"
    reps = int(argv[1]) if len(argv) > 1 else 7
    if len(argv) > 2:
        torch.set_num_threads(int(argv[2]))
    backend = backends.resolve(name, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(L, B, D, generator=generator)
    docs = torch.randn(L, N, D, generator=generator)
    no_positive, positives = torch.full((B,), -1), torch.arange(B)
    self_excluded = Rules(exclude_own_group=True, group_period=B, row_group=torch.arange(B))
    own_group = self_excluded  # the same rule: column j belongs to group j % B
    cases = {
        "q-vs-q (self excluded)": (queries, queries, no_positive, self_excluded),
        "q-vs-q triangle + K=B": (queries, queries, no_positive, Rules(triangle=True, column_statistics=B)),
        "q-vs-d plain": (queries, docs, positives, Rules()),
        "q-vs-d + K=B": (queries, docs, positives, Rules(column_statistics=B)),
        "d+-vs-d (own group)": (docs[:, :B], docs, no_positive, own_group),
        "d+-vs-d triangle + K=B": (docs[:, :B], docs, no_positive,
                                   dataclasses.replace(own_group, triangle=True, column_statistics=B)),
    }
    times = {case: [] for case in cases}
    cpu_times = {case: [] for case in cases}
    for args in cases.values():  # warm-up (extension load, thread pools)
        _step(backend, *args)
    for _ in range(reps):
        for case, args in cases.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(backend, *args)
            times[case].append(time.perf_counter() - start)
            cpu_times[case].append(time.process_time() - cpu_start)
    medians = {case: statistics.median(values) for case, values in times.items()}
    cpu_medians = {case: statistics.median(values) for case, values in cpu_times.items()}
    baselines = {"q-vs-q triangle + K=B": "q-vs-q (self excluded)", "q-vs-d + K=B": "q-vs-d plain",
                 "d+-vs-d triangle + K=B": "d+-vs-d (own group)"}
    print(f"{name}, L={L} B={B} N={N} D={D} dims={DIMS} fp32, {torch.get_num_threads()} threads, median of {reps}")
    for case, median in medians.items():
        cpu = cpu_medians[case]
        ratio = (f"  {median / medians[baselines[case]]:.2f}x wall, {cpu / cpu_medians[baselines[case]]:.2f}x CPU"
                 if case in baselines else "")
        print(f"  {case:26s} {median * 1e3:8.1f} ms wall {cpu * 1e3:8.1f} ms CPU{ratio}")


if __name__ == "__main__":
    main(sys.argv[1:])
