"""Memory and time of the CPU backends against the batch size (issue 13): L=1, N=2B, D=384, dims 32..384.

Each case's peak extra memory (above the inputs, gradients included) is measured in a fresh
process (memory_scaling.py) and stored in ``extra_info``; the time is pytest-benchmark's,
in this process, after a warm-up. Large cases take minutes on a small machine:

    pytest benchmarks/test_bench_memory_scaling.py --benchmark-storage=/tmp/m2d-bench \
        --benchmark-save=memory-scaling
    python benchmarks/plot_memory_scaling.py /tmp/m2d-bench/*/*_memory-scaling.json -o memory-scaling.png
"""

from __future__ import annotations

import pytest
import torch
from memory_scaling import DEFAULT_DIMS, measure_in_fresh_process

import m2d_kernels as m2d
from m2d_kernels import backends

BATCHES = [1024, 2048, 4096, 8192, 16384]
N_FEATURES = 384


@pytest.mark.parametrize("n_queries", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_memory_scaling(benchmark, backend, n_queries):
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")
    n_docs = 2 * n_queries
    memory = measure_in_fresh_process(backend, 1, n_queries, n_docs, N_FEATURES, DEFAULT_DIMS, reps=0)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, n_queries, N_FEATURES, generator=generator).requires_grad_()
    docs = torch.randn(1, n_docs, N_FEATURES, generator=generator).requires_grad_()

    def step():
        queries.grad = docs.grad = None
        m2d.matryoshka_2d_infonce(queries, docs, DEFAULT_DIMS, backend=backend).backward()

    step()
    benchmark.group = "memory-scaling"
    benchmark.pedantic(step, rounds=3 if n_queries <= 4096 else 1, iterations=1)
    benchmark.extra_info.update(
        provider=backend,
        shape=dict(L=1, B=n_queries, N=n_docs, D=N_FEATURES, dims=list(DEFAULT_DIMS)),
        dtype="float32",
        peak_extra_bytes=memory["peak_extra_bytes"],
        input_bytes=memory["input_bytes"],
        gradient_bytes=memory["input_bytes"],
    )
