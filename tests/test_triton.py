"""Backend ``triton`` against the float64 NumPy oracle and the ``reference`` backend.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set in conftest.py) on small
shapes; on a GPU the same tests run natively. The triton backend takes fp32/fp16/bf16
inputs (not fp64), so exactness is checked with fp32 inputs against the float64 truth
computed from the same fp32 values, at the fp32 tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_close,
    assert_within_twice_reference_error,
    loss_and_grads,
    make_inputs,
    oracle_pair_losses,
)

import m2d_kernels as m2d
from m2d_kernels.backends import unavailable_reason

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if unavailable_reason("triton", torch.device(DEVICE)) is not None:
    pytest.skip(f"triton backend unavailable: {unavailable_reason('triton', torch.device(DEVICE))}",
                allow_module_level=True)

FP32 = torch.float32
# Inputs are random but seeded per test: fp32 results sit within the fp32 tolerance with some
# margin, and a test must not pass or fail by the draw.


def _check_against_truth(queries, docs, dims, weights=None, **kwargs):
    """Per-pair losses against the NumPy oracle; loss and both gradients against `reference` in float64."""
    per_pair = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, reduction="none", backend="triton", **kwargs)
    assert per_pair.dtype == queries.dtype and per_pair.shape == (queries.shape[0], len(dims))
    expected = torch.from_numpy(oracle_pair_losses(queries, docs, dims, weights, **kwargs))
    assert_close(per_pair, expected, FP32, "per-pair losses")
    truth = loss_and_grads(queries.double().cpu(), docs.double().cpu(), dims, weights, backend="reference", **kwargs)
    got = loss_and_grads(queries, docs, dims, weights, backend="triton", **kwargs)
    for name, g, t in zip(("loss", "grad_queries", "grad_docs"), got, truth, strict=True):
        assert g.dtype == FP32, f"{name} has dtype {g.dtype}"
        assert_close(g, t, FP32, name)


# (L, B, N, D, dims): B = 1, 3, 37; N = 3B hard negatives; D and dims not multiples of 16.
SHAPES = [
    (1, 1, 3, 48, (16, 48)),
    (2, 3, 9, 100, (24, 40, 100)),
    (1, 37, 37, 48, (8, 20, 48)),
    (2, 5, 15, 48, (5, 30)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-B{}-N{}-D{}".format(*s[:4]))
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_oracle(shape, symmetric):
    n_layers, n_queries, n_docs, n_features, dims = shape
    queries, docs = make_inputs(n_layers, n_queries, n_docs, n_features, dtype=FP32, device=DEVICE, seed=1)
    _check_against_truth(queries, docs, dims, symmetric=symmetric)


@pytest.mark.parametrize("symmetric", [False, True])
def test_positive_index_hard_negatives_and_zero_weights(symmetric):
    queries, docs = make_inputs(2, 6, 18, 100, dtype=FP32, device=DEVICE, seed=2)
    positive_index = torch.randperm(18, generator=torch.Generator().manual_seed(0))[:6].to(DEVICE)
    # Layer 0 skips the middle dim, layer 1 computes only the smallest one.
    weights = torch.tensor([[1.5, 0.0, 0.5], [2.0, 0.0, 0.0]], dtype=torch.float64)
    _check_against_truth(queries, docs, (24, 40, 100), weights, positive_index=positive_index, symmetric=symmetric)


@pytest.mark.parametrize("scale", [40.0, 100.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_large_scale_with_anticorrelated_candidates(scale, symmetric):
    """All cosines near -1: sum_j exp(scale * (cos - 1)) underflows at scale 100, so the kernel must
    switch to a running maximum to stay exact (scale 40 still takes the fixed-maximum path)."""
    queries, docs = make_inputs(1, 4, 8, 48, dtype=FP32, device=DEVICE, requires_grad=False, seed=3)
    docs = -queries.repeat(1, 2, 1) + 0.05 * docs
    _check_against_truth(queries, docs, (16, 48), scale=scale, symmetric=symmetric)


def test_all_weights_zero_gives_zero_loss_and_gradients():
    queries, docs = make_inputs(2, 3, 6, 48, dtype=FP32, device=DEVICE, seed=4)
    loss, grad_q, grad_d = loss_and_grads(queries, docs, (16, 48), torch.zeros(2, 2), backend="triton")
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_q) == 0 and torch.count_nonzero(grad_d) == 0


def test_features_beyond_largest_dim_get_zero_gradient():
    queries, docs = make_inputs(1, 3, 6, 48, dtype=FP32, device=DEVICE, seed=5)
    _, grad_q, grad_d = loss_and_grads(queries, docs, (8, 20), backend="triton")
    assert torch.count_nonzero(grad_q[..., 20:]) == 0 and torch.count_nonzero(grad_d[..., 20:]) == 0
    assert torch.count_nonzero(grad_q[..., :20]) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_low_precision_within_twice_reference_error(dtype, symmetric):
    queries, docs = make_inputs(2, 5, 15, 100, dtype=torch.float64, seed=6)
    # The truth is taken on inputs the low dtype represents exactly, so the rule compares compute
    # errors rather than the input rounding that every backend shares (and the reference's bf16
    # arithmetic sometimes cancels by chance).
    queries, docs = queries.detach().to(dtype).double(), docs.detach().to(dtype).double()
    assert_within_twice_reference_error("triton", queries, docs, (24, 40, 100), dtype, device=DEVICE,
                                        symmetric=symmetric, scale=20.0)


def test_nan_propagates():
    queries, docs = make_inputs(1, 3, 3, 48, dtype=FP32, device=DEVICE, requires_grad=False, seed=7)
    queries[0, 1, 5] = float("nan")
    assert torch.isnan(m2d.matryoshka_2d_infonce(queries, docs, (16, 48), backend="triton"))


def test_float64_is_rejected_naming_the_argument():
    queries, docs = make_inputs(1, 3, 3, 48, dtype=torch.float64, device=DEVICE, seed=8)
    with pytest.raises(TypeError, match="queries"):
        m2d.matryoshka_2d_infonce(queries, docs, (16, 48), backend="triton")


def test_torch_compile_fullgraph_matches_reference():
    """The public function traces with fullgraph=True: validation is host-side Python on
    shapes and weights, and the kernels sit behind opaque custom ops with fake
    implementations and a registered autograd formula."""
    queries, docs = make_inputs(2, 3, 9, 48, dtype=FP32, device=DEVICE, seed=9)
    positive_index = torch.tensor([4, 0, 7], device=DEVICE)
    weights = [[1.0, 0.5], [0.0, 2.0]]

    def step(q, k):
        return m2d.matryoshka_2d_infonce(q, k, (16, 48), weights, positive_index=positive_index, symmetric=True,
                                         backend="triton")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    q = queries.detach().clone().requires_grad_(True)
    k = docs.detach().clone().requires_grad_(True)
    loss = compiled(q, k)
    loss.backward()
    truth = loss_and_grads(queries.double().cpu(), docs.double().cpu(), (16, 48), weights, backend="reference",
                           positive_index=positive_index.cpu(), symmetric=True)
    for name, g, t in zip(("loss", "grad_queries", "grad_docs"), (loss.detach(), q.grad, k.grad), truth,
                          strict=True):
        assert_close(g, t, FP32, name)


def test_custom_op_passes_opcheck():
    from m2d_kernels.backends import triton_kernels

    queries, docs = make_inputs(1, 3, 6, 48, dtype=FP32, device=DEVICE, seed=10)
    positives = torch.tensor([2, 0, 4], device=DEVICE)
    torch.library.opcheck(triton_kernels.m2d_forward, (queries, docs, positives, [16, 48], [True, True], 20.0, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_availability(monkeypatch):
    from m2d_kernels.backends import triton_kernels

    assert "triton" in m2d.available_backends()
    assert triton_kernels.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "needs CUDA tensors" in triton_kernels.unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels.unavailable_reason(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="native GPU shapes only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_medium_shape(dtype):
    dims = (32, 64, 128, 256, 384)
    queries, docs = make_inputs(3, 300, 900, 384, dtype=torch.float64, seed=11)
    if dtype == torch.float32:
        _check_against_truth(queries.float().cuda(), docs.float().cuda(), dims, symmetric=True)
    else:
        queries, docs = queries.detach().to(dtype).double(), docs.detach().to(dtype).double()
        assert_within_twice_reference_error("triton", queries, docs, dims, dtype, device="cuda", symmetric=True)


_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from m2d_kernels.backends import triton_kernels as tk

INT_POINTERS = {"positives_ptr", "bounds_ptr", "active_ptr", "n_seg_ptr"}
INPUT_POINTERS = {"rows_ptr", "cols_ptr", "grad_ptr"}
SCALARS = {"L": "i32", "R": "i32", "C": "i32", "D": "i32", "scale_log2": "fp32"}
for autotuned, constexprs in (
    (tk._m2d_fwd_kernel, {"FIXED_MAX": False}),
    (tk._m2d_bwd_kernel, {"FOR_COLS": False}),
    (tk._m2d_bwd_kernel, {"FOR_COLS": True}),
):
    config = autotuned.configs[-1]
    constexprs.update(M=6, M_PAD=8, DOT_PRECISION="tf32", DOT_IN_FP32=False, **config.kwargs)
    names = autotuned.fn.arg_names
    signature = {
        name: "constexpr" if name in constexprs else SCALARS.get(name)
        or ("*i32" if name in INT_POINTERS else "*bf16" if name in INPUT_POINTERS else "*fp32")
        for name in names
    }
    source = ASTSource(autotuned.fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    triton.compile(source, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": config.num_warps, "num_stages": config.num_stages})
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels natively")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels as Python; this compiles them to an sm_90 binary (bf16, the
    largest tile config) so that what only the GPU compiler rejects is caught without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
