"""Forward+backward of the fused 2D Matryoshka InfoNCE, every provider side by side.

Providers: each backend of the registry that can run on the device (``reference`` is the
naive per-pair computation sentence-transformers does), and ``reference-compile``
(``torch.compile`` of the reference). Recorded per case in ``extra_info``: peak memory
beyond the inputs (see memory.py; ``gradient_bytes`` of it are the gradients themselves)
and achieved GFLOP/s against the prefix-trick FLOP count

    forward  = 2 * L * B * N * D            (one product over D per layer, all dims shared)
    backward = 3 * forward                  (recompute S, then dQ and dK products)
    total    = 8 * L * B * N * D

Run (CPU) and store:
    pytest benchmarks/test_bench_loss.py --benchmark-storage=benchmarks/results --benchmark-save=cpu
Regression gate against the stored run of this suite on this kind of machine (benchmarks/gate.py,
docs/benchmarks.md; pytest-benchmark's own --benchmark-compare picks the latest file of any suite):
    python benchmarks/gate.py check
"""

from __future__ import annotations

import pytest
import torch
from memory import peak_extra_bytes

import m2d_kernels as m2d
from m2d_kernels import backends
from m2d_kernels.backends import reference
from m2d_kernels.objective import Objective

DIMS = (32, 64, 128, 256, 384)
# (L, B, N, D): the shapes of the README's CPU tables; N = 2B (one hard negative per query).
CPU_SHAPES = [(7, 256, 512, 384), (7, 1024, 2048, 384)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ["reference", "reference-compile", "torch", "cpp", "triton"]


def prefix_trick_flop(n_layers, n_queries, n_docs, n_features):
    return 8 * n_layers * n_queries * n_docs * n_features


def _loss_fn(provider, dims):
    if provider == "reference-compile":
        n_dims = len(dims)

        @torch.compile(dynamic=False)
        def compiled(queries, docs, positive_index):
            active = ((True,) * n_dims,) * queries.shape[0]
            return reference.objective_losses(queries, queries, docs, 0, positive_index, dims, active, 20.0,
                                              Objective())[0].sum()

        return lambda q, d: compiled(q, d, torch.arange(q.shape[1], device=q.device))
    reason = backends.unavailable_reason(provider, DEVICE)
    if reason is not None:
        pytest.skip(f"{provider} unavailable: {reason}")
    return lambda q, d: m2d.matryoshka_2d_infonce(q, d, dims, backend=provider)


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "L{}-B{}-N{}-D{}".format(*s))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(benchmark, provider, shape):
    if DEVICE.type == "cuda":
        pytest.skip("GPU shapes live in test_bench_gpu.py")
    n_layers, n_queries, n_docs, n_features = shape
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(n_layers, n_queries, n_features, generator=generator).requires_grad_()
    docs = torch.randn(n_layers, n_docs, n_features, generator=generator).requires_grad_()
    loss_fn = _loss_fn(provider, DIMS)

    def step():
        queries.grad = docs.grad = None
        loss_fn(queries, docs).backward()

    step()  # warm-up: compilation, extension build, allocator
    benchmark.group = "L{}-B{}-N{}-D{}".format(*shape)
    benchmark.pedantic(step, rounds=9, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    flop = prefix_trick_flop(*shape)
    benchmark.extra_info.update(
        provider=provider,
        shape=dict(L=n_layers, B=n_queries, N=n_docs, D=n_features, dims=list(DIMS)),
        dtype="float32",
        prefix_trick_flop=flop,
        gflops=flop / median / 1e9,
        peak_extra_bytes=peak_extra_bytes(step, DEVICE),
        # The gradients are outputs every provider must allocate; the rest is working memory.
        gradient_bytes=(queries.numel() + docs.numel()) * queries.element_size(),
    )
