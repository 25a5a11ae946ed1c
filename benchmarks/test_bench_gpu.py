"""GPU benchmark grid of the issue's targets: forward+backward time, peak memory and TFLOP/s.

Cases (bf16 inputs, full grid of weights, query-to-doc only):

    worked   L=12, B=N=8192,  D=768, dims (32, 64, 128, 256, 512, 768)
    single   L=1,  B=N=32768, D=768, dims (768,)                 (Inf-CL when ``inf_cl`` imports)
    b65536   L=12, B=N=65536, D=768, dims as worked               (triton only: the others need B x N per pair)

Providers: ``reference`` (naive per pair, what sentence-transformers does),
``reference-compile`` (``torch.compile`` of it), ``torch`` (chunked prefix trick),
``triton`` and ``inf-cl``. ``extra_info`` records, per case: ``peak_extra_bytes``
(``torch.cuda.max_memory_allocated`` during one forward+backward minus what was allocated
before it, i.e. beyond the inputs), ``grad_bytes`` (the two gradients, part of that peak),
and ``tflops`` against the prefix-trick count ``2*L*B*N*D`` forward plus ``3x`` that
backward (``8*L*B*N*D`` in all). ``test_bf16_mm_rate`` measures a plain bf16 ``torch.mm`` in
the same run for scale.

    pytest benchmarks/test_bench_gpu.py --benchmark-json=benchmarks/results/gpu.json

(``benchmarks/gpu.sh`` runs the GPU tests, this grid and the summary in one call.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import m2d_kernels as m2d
from m2d_kernels.backends import reference
from m2d_kernels.objective import Objective

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA device", allow_module_level=True)

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
WORKED_DIMS = (32, 64, 128, 256, 512, 768)
CASES = {
    "worked": (12, 8192, 8192, 768, WORKED_DIMS),
    "single": (1, 32768, 32768, 768, (768,)),
    "b65536": (12, 65536, 65536, 768, WORKED_DIMS),
}
PROVIDERS = {
    "worked": ["reference", "reference-compile", "torch", "triton"],
    "single": ["reference", "reference-compile", "torch", "triton", "inf-cl"],
    "b65536": ["triton"],
}
GRID = [(case, provider) for case, providers in PROVIDERS.items() for provider in providers]


def _inputs(n_layers, n_queries, n_docs, n_features):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    queries = torch.randn(n_layers, n_queries, n_features, device=DEVICE, dtype=DTYPE, generator=generator)
    docs = torch.randn(n_layers, n_docs, n_features, device=DEVICE, dtype=DTYPE, generator=generator)
    docs[:, :n_queries] += queries
    return queries.requires_grad_(True), docs.requires_grad_(True)


def _loss_fn(provider, n_layers, n_queries, dims):
    if provider == "inf-cl":
        inf_cl = pytest.importorskip("inf_cl")
        scale = torch.tensor(20.0, device=DEVICE)
        # One pair: Inf-CL takes normalised [B, D] features and the scale.
        return lambda q, k: inf_cl.cal_inf_loss(F.normalize(q[0], dim=-1), F.normalize(k[0], dim=-1), scale=scale)
    if provider == "reference-compile":
        # The reference backend's naive losses, compiled (the public function's host-side validation stays eager).
        active = tuple((True,) * len(dims) for _ in range(n_layers))
        positives = torch.arange(n_queries, device=DEVICE)
        compiled = torch.compile(lambda q, k: reference.objective_losses(q, q, k, 0, positives, dims, active, 20.0,
                                                                         Objective())[0])
        return lambda q, k: compiled(q, k).sum()
    return lambda q, k: m2d.matryoshka_2d_infonce(q, k, dims, backend=provider)


def _step(loss_fn, queries, docs):
    queries.grad = docs.grad = None
    loss_fn(queries, docs).backward()
    torch.cuda.synchronize()


@pytest.mark.parametrize(("case", "provider"), GRID, ids=[f"{c}-{p}" for c, p in GRID])
def test_forward_backward(benchmark, case, provider):
    n_layers, n_queries, n_docs, n_features, dims = CASES[case]
    benchmark.group = case
    queries, docs = _inputs(n_layers, n_queries, n_docs, n_features)
    loss_fn = _loss_fn(provider, n_layers, n_queries, dims)
    _step(loss_fn, queries, docs)  # compile / autotune outside the measurement

    queries.grad = docs.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _step(loss_fn, queries, docs)
    peak_extra = torch.cuda.max_memory_allocated() - before

    benchmark.pedantic(_step, args=(loss_fn, queries, docs), rounds=5, iterations=1, warmup_rounds=1)
    flops = 8 * n_layers * n_queries * n_docs * n_features
    benchmark.extra_info.update(
        provider=provider,
        shape={"L": n_layers, "B": n_queries, "N": n_docs, "D": n_features, "dims": list(dims)},
        dtype=str(DTYPE),
        peak_extra_bytes=peak_extra,
        grad_bytes=queries.numel() * queries.element_size() + docs.numel() * docs.element_size(),
        prefix_flops=flops,
        tflops=flops / benchmark.stats.stats.median / 1e12,
    )


def test_bf16_mm_rate(benchmark):
    size = 8192
    a = torch.randn(size, size, device=DEVICE, dtype=DTYPE)
    b = torch.randn(size, size, device=DEVICE, dtype=DTYPE)

    def matmul():
        torch.mm(a, b)
        torch.cuda.synchronize()

    benchmark.group = "mm"
    benchmark.pedantic(matmul, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(provider="torch.mm", tflops=2 * size**3 / benchmark.stats.stats.median / 1e12)
