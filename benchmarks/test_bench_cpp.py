"""The CPU's practical GEMM ceiling, to read the ``cpp`` backend's GFLOP/s against.

``test_bench_loss.py`` times every backend at the standard shapes; this adds, in the same
benchmark groups, a plain fp32 ``torch.mm`` of the same size (``[B, D] @ [D, N]`` once per
layer, i.e. exactly the forward FLOP count ``2 * L * B * N * D``). Run both in one process
so that the numbers share the machine's state:

    pytest benchmarks/test_bench_loss.py benchmarks/test_bench_cpp.py \
        --benchmark-storage=benchmarks/results --benchmark-save=cpu

Each provider's median over ``torch.mm``'s at the same shape is the figure benchmarks/gate.py compares
across machines (measured side by side, it does not depend on the machine's load as much as a median).
"""

from __future__ import annotations

import pytest
import torch

# (L, B, N, D): the CPU shapes of test_bench_loss.py.
CPU_SHAPES = [(7, 256, 512, 384), (7, 1024, 2048, 384)]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "L{}-B{}-N{}-D{}".format(*s))
def test_torch_mm_ceiling(benchmark, shape):
    n_layers, n_queries, n_docs, n_features = shape
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(n_layers, n_queries, n_features, generator=generator)
    docs_t = torch.randn(n_layers, n_features, n_docs, generator=generator)
    out = torch.empty(n_queries, n_docs)

    def products():
        for layer in range(n_layers):
            torch.mm(queries[layer], docs_t[layer], out=out)

    products()
    benchmark.group = "L{}-B{}-N{}-D{}".format(*shape)
    benchmark.pedantic(products, rounds=9, warmup_rounds=1, iterations=1)
    flop = 2 * n_layers * n_queries * n_docs * n_features
    benchmark.extra_info.update(
        provider="torch.mm",
        shape=dict(L=n_layers, B=n_queries, N=n_docs, D=n_features),
        dtype="float32",
        flop=flop,
        gflops=flop / benchmark.stats.stats.median / 1e9,
    )
    assert torch.isfinite(out).all()
