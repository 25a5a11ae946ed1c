"""Backend ``triton`` against the float64 NumPy oracle and the ``reference`` backend.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set in conftest.py) on small
shapes; on a GPU the same tests run natively. The triton backend takes fp32/fp16/bf16
inputs (not fp64), so exactness is checked with fp32 inputs against the float64 truth
computed from the same fp32 values, at the fp32 tolerance.
"""

from __future__ import annotations

import json
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
from m2d_kernels.backends.base import Softmax

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if unavailable_reason("triton", torch.device(DEVICE)) is not None:
    pytest.skip(f"triton backend unavailable: {unavailable_reason('triton', torch.device(DEVICE))}",
                allow_module_level=True)

import triton.language as tl  # noqa: E402

from m2d_kernels.backends.triton_tiles import _dot, _mma_operand, _to_tf32  # noqa: E402

FP32 = torch.float32
# The tolerance of fp32 results: fp32 products run as tf32x3 (emulated under the interpreter, as on the GPU).
TF32X3 = "tf32x3"
TF32X3_FACTOR = 4  # the same widening for the tests that scale their fp32 tolerances by the largest entry
# Inputs are random but seeded per test: fp32 results sit within the fp32 tolerance with some
# margin, and a test must not pass or fail by the draw.


def _check_against_truth(queries, docs, dims, weights=None, **kwargs):
    """Per-pair losses against the NumPy oracle; loss and both gradients against `reference` in float64."""
    per_pair = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, reduction="none", backend="triton", **kwargs)
    assert per_pair.dtype == queries.dtype and per_pair.shape == (queries.shape[0], len(dims))
    expected = torch.from_numpy(oracle_pair_losses(queries, docs, dims, weights, **kwargs))
    assert_close(per_pair, expected, TF32X3, "per-pair losses")
    truth = loss_and_grads(queries.double().cpu(), docs.double().cpu(), dims, weights, backend="reference", **kwargs)
    got = loss_and_grads(queries, docs, dims, weights, backend="triton", **kwargs)
    for name, g, t in zip(("loss", "grad_queries", "grad_docs"), got, truth, strict=True):
        assert g.dtype == FP32, f"{name} has dtype {g.dtype}"
        assert_close(g, t, TF32X3, name)


# (L, B, N, D, dims): B = 1, 3, 37; N = 3B hard negatives; D and dims not multiples of 16.
SHAPES = [
    (1, 1, 3, 48, (16, 48)),
    (2, 3, 9, 100, (24, 40, 100)),
    (1, 37, 37, 48, (8, 20, 48)),
    (2, 5, 15, 48, (5, 30)),
    (1, 5, 10, 64, (32, 64)),  # aligned: BLOCK_D 32, unmasked k-loops
    (2, 7, 21, 64, (16, 32, 64)),  # aligned, three segments: one flat k-loop with an epilogue per boundary
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-B{}-N{}-D{}".format(*s[:4]))
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_oracle(shape, symmetric):
    n_layers, n_queries, n_docs, n_features, dims = shape
    queries, docs = make_inputs(n_layers, n_queries, n_docs, n_features, dtype=FP32, device=DEVICE, seed=1)
    _check_against_truth(queries, docs, dims, symmetric=symmetric)


# Segment loops (dims 24, 40, 100: masked chunks) and the flat k-loops (16, 32, 64: aligned).
FEATURES_AND_DIMS = [(100, (24, 40, 100)), (64, (16, 32, 64))]


@pytest.mark.parametrize("features_and_dims", FEATURES_AND_DIMS, ids=lambda f: f"D{f[0]}")
@pytest.mark.parametrize("symmetric", [False, True])
def test_positive_index_hard_negatives_and_zero_weights(symmetric, features_and_dims):
    n_features, dims = features_and_dims
    queries, docs = make_inputs(2, 6, 18, n_features, dtype=FP32, device=DEVICE, seed=2)
    positive_index = torch.randperm(18, generator=torch.Generator().manual_seed(0))[:6].to(DEVICE)
    # Layer 0 skips the middle dim, layer 1 computes only the smallest one.
    weights = torch.tensor([[1.5, 0.0, 0.5], [2.0, 0.0, 0.0]], dtype=torch.float64)
    _check_against_truth(queries, docs, dims, weights, positive_index=positive_index, symmetric=symmetric)


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


@pytest.mark.parametrize("features_and_dims", FEATURES_AND_DIMS, ids=lambda f: f"D{f[0]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_low_precision_within_twice_reference_error(dtype, symmetric, features_and_dims):
    n_features, dims = features_and_dims
    queries, docs = make_inputs(2, 5, 15, n_features, dtype=torch.float64, seed=6)
    # The truth is taken on inputs the low dtype represents exactly, so the rule compares compute
    # errors rather than the input rounding that every backend shares (and the reference's bf16
    # arithmetic sometimes cancels by chance).
    queries, docs = queries.detach().to(dtype).double(), docs.detach().to(dtype).double()
    assert_within_twice_reference_error("triton", queries, docs, dims, dtype, device=DEVICE,
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
        assert_close(g, t, TF32X3, name)


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


def _naive_losses(queries, docs, dims, scale, positive_index, symmetric):
    """[L, M] losses in float64 with ``scale`` a tensor (for d loss / d scale), written out directly."""
    out = []
    for layer in range(queries.shape[0]):
        row = []
        for d in dims:
            q = queries[layer, :, :d] / queries[layer, :, :d].norm(dim=1, keepdim=True)
            k = docs[layer, :, :d] / docs[layer, :, :d].norm(dim=1, keepdim=True)
            logits = scale * q @ k.T
            loss = (logits.logsumexp(1) - logits[torch.arange(len(q)), positive_index]).mean()
            if symmetric:
                columns = logits[:, positive_index]
                loss = (loss + (columns.logsumexp(0) - columns.diagonal()).mean()) / 2
            row.append(loss)
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale", [20.0, 100.0])  # fixed and running maximum
def test_scale_gradient_matches_float64_autograd(symmetric, scale):
    from m2d_kernels.backends import triton_kernels

    # 40 candidates near copies of the queries (3 column tiles): the running maximum moves between
    # tiles by small steps, where the rescaling of sum_j e_j (z_j - max) matters.
    queries, docs = make_inputs(2, 5, 40, 48, dtype=FP32, device=DEVICE, requires_grad=False, seed=12)
    docs = queries.repeat(1, 8, 1) + 0.1 * docs
    positive_index = torch.tensor([35, 0, 37, 21, 39], device=DEVICE)
    active = ((True, False, True), (False, True, True))
    losses, dscale = triton_kernels.pair_losses(queries, docs, (16, 32, 48), active, scale, positive_index,
                                                symmetric, scale_grad=True)
    assert dscale.dtype == FP32 and not dscale.requires_grad
    scale64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    truth = _naive_losses(queries.double().cpu(), docs.double().cpu(), (16, 32, 48), scale64,
                          positive_index.cpu(), symmetric)
    mask = torch.tensor(active, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(truth[i, j], scale64, retain_graph=True)[0] * mask[i, j]
                            for i in range(2) for j in range(3)]).view(2, 3)
    assert_close(losses, truth.detach() * mask, TF32X3, "losses")
    assert_close(dscale, expected, TF32X3, "dloss_dscale")
    # The default path returns the losses alone.
    assert triton_kernels.pair_losses(queries, docs, (16, 32, 48), active, scale, positive_index,
                                      symmetric).shape == (2, 3)


@pytest.mark.parametrize("scale", [1e4, 1e8])
def test_large_scales_stay_accurate(scale):
    """Row statistics relative to the row maximum and a recompute in the forward's order: no
    ulp(scale) error in the probabilities (loss and gradients against float64 at 1e-4)."""
    queries, docs = make_inputs(1, 6, 12, 48, dtype=FP32, device=DEVICE, seed=13)
    truth = loss_and_grads(queries.double().cpu(), docs.double().cpu(), (16, 48), backend="reference", scale=scale,
                           symmetric=True)
    got = loss_and_grads(queries, docs, (16, 48), backend="triton", scale=scale, symmetric=True)
    assert abs(got[0].item() - truth[0].item()) <= 1e-4 * abs(truth[0].item())
    for name, g, t in zip(("grad_queries", "grad_docs"), got[1:], truth[1:], strict=True):
        assert (g.double().cpu() - t).abs().max() <= 1e-4 * t.abs().max(), name


def test_huge_scale_is_finite():
    queries, docs = make_inputs(1, 4, 8, 48, dtype=FP32, device=DEVICE, seed=14)
    loss, grad_q, grad_d = loss_and_grads(queries, docs, (16, 48), backend="triton", scale=1e10)
    assert torch.isfinite(loss) and torch.isfinite(grad_q).all() and torch.isfinite(grad_d).all()


def test_strided_positive_index_and_inputs():
    """An expanded index, a column of a stacked index and non-contiguous embeddings give the same
    losses and gradients as the float64 reference."""
    base_q, base_d = make_inputs(2, 4, 12, 96, dtype=FP32, device=DEVICE, requires_grad=False, seed=15)
    queries = base_q[:, :, ::2]  # stride 2 along D
    docs = base_d.transpose(0, 1).contiguous().transpose(0, 1)[:, :, :48]  # layer-major strides
    stacked = torch.tensor([[5, 1], [2, 9], [7, 3], [0, 11]], device=DEVICE)
    for positive_index in (torch.tensor([3], device=DEVICE).expand(4), stacked[:, 1]):
        assert not positive_index.is_contiguous()
        _check_against_truth(queries, docs, (16, 48), positive_index=positive_index, symmetric=True)


def test_double_backward_raises():
    queries, docs = make_inputs(1, 3, 6, 48, dtype=FP32, device=DEVICE, seed=16)
    loss = m2d.matryoshka_2d_infonce(queries, docs, (16, 48), backend="triton")
    grad = torch.autograd.grad(loss, queries, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@triton.jit
def _round_tile(h_ptr, out_ptr, FOR_COLS: tl.constexpr):
    offsets = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(out_ptr + offsets, _mma_operand(tl.load(h_ptr + offsets), FOR_COLS, tl.bfloat16, True))


@pytest.mark.parametrize("for_cols", [False, True])
def test_gradient_tile_is_rounded_to_bf16_before_its_mma(for_cols):
    """The GPU multiplies the fp32 gradient tile H (H^T for dY) as bf16; under the interpreter the product
    runs in fp32, so `_mma_operand` rounds H first. Checked on the helper (a jit kernel under the interpreter)."""
    h = torch.randn(16, 16, generator=torch.Generator().manual_seed(17), device=DEVICE)
    out = torch.empty_like(h)
    _round_tile[(1,)](h, out, for_cols)
    expected = h.t() if for_cols else h
    assert torch.equal(out, expected.bfloat16().float()) and not torch.equal(out, expected)


def _tf32_reference(x: torch.Tensor, round_nearest: bool) -> torch.Tensor:
    """x (fp32) to 11 significant bits in float64: to nearest with ties away from zero, or truncated."""
    mantissa, exponent = torch.frexp(x.double())  # |mantissa| in [0.5, 1)
    scaled = mantissa.abs() * 2.0 ** 11
    kept = torch.floor(scaled + 0.5) if round_nearest else torch.floor(scaled)
    return torch.sign(mantissa) * kept * 2.0 ** (exponent - 11)


@triton.jit
def _tf32_tiles(x_ptr, rounded_ptr, truncated_ptr):
    offsets = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + offsets)
    tl.store(rounded_ptr + offsets, _to_tf32(x, True))
    tl.store(truncated_ptr + offsets, _to_tf32(x, False))


def test_tf32_rounding_matches_the_gpu_conversions():
    """`_to_tf32`: cvt.rna (ties away from zero) and the tensor core's truncation, against frexp in float64;
    the inputs include exact ties at both signs."""
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(41), device=DEVICE)
    ties = torch.tensor([1 + 2 ** -11, -(1 + 2 ** -11), 1 + 3 * 2 ** -11, 3.0, -0.75, 2 ** -20 * (1 + 2 ** -11)])
    x.view(-1)[: len(ties)] = ties.to(DEVICE)
    rounded, truncated = torch.empty_like(x), torch.empty_like(x)
    _tf32_tiles[(1,)](x, rounded, truncated)
    assert torch.equal(rounded.double().cpu(), _tf32_reference(x.cpu(), True))
    assert torch.equal(truncated.double().cpu(), _tf32_reference(x.cpu(), False))
    assert rounded.view(-1)[0] == 1 + 2 ** -10 and rounded.view(-1)[1] == -(1 + 2 ** -10)  # ties away from zero


@triton.jit
def _dot_tiles(a_ptr, b_ptr, out_ptr, DOT_PRECISION: tl.constexpr):
    offsets = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    out = _dot(tl.load(a_ptr + offsets), tl.load(b_ptr + offsets), tl.zeros([16, 16], tl.float32), DOT_PRECISION)
    tl.store(out_ptr + offsets, out)


def test_tf32x3_emulation_is_the_three_product_decomposition():
    """The interpreter's "tf32x3-emulated" product equals small*big + big*small + big*big built independently
    (float64 sums of the tf32 parts) up to fp32 accumulation, and sits within 2^-20 of the exact product where
    one tf32 product is off by more than 2^-16."""
    generator = torch.Generator().manual_seed(43)
    a, b = (torch.randn(16, 16, generator=generator, device=DEVICE) for _ in range(2))
    big_a, big_b = _tf32_reference(a.cpu(), True), _tf32_reference(b.cpu(), True)
    small_a = _tf32_reference((a.double().cpu() - big_a).float(), False)
    small_b = _tf32_reference((b.double().cpu() - big_b).float(), False)
    expected = small_a @ big_b + big_a @ small_b + big_a @ big_b
    exact = a.double().cpu() @ b.double().cpu()
    out = {}
    for precision in ("tf32x3-emulated", "tf32-emulated"):
        out[precision] = torch.empty_like(a)
        _dot_tiles[(1,)](a, b, out[precision], precision)
    scale = exact.abs().max()
    assert ((out["tf32x3-emulated"].double().cpu() - expected).abs().max() / scale) < 2e-7
    assert ((out["tf32x3-emulated"].double().cpu() - exact).abs().max() / scale) < 2 ** -20
    assert ((out["tf32-emulated"].double().cpu() - exact).abs().max() / scale) > 2 ** -16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the variable only chooses the interpreter's product")
def test_interpreter_fp32_precision_is_validated(monkeypatch):
    from m2d_kernels.backends import triton_configs as tk

    monkeypatch.setenv(tk.INTERPRET_FP32_ENV, "tf16")
    queries, docs = make_inputs(1, 3, 3, 48, dtype=FP32, device=DEVICE, requires_grad=False, seed=9)
    with pytest.raises(ValueError, match=tk.INTERPRET_FP32_ENV):
        m2d.matryoshka_2d_infonce(queries, docs, (16, 48), backend="triton")


def test_at_most_twelve_configs_and_size_class_key():
    from m2d_kernels.backends import triton_kernels as tk

    for tuned in (tk._m2d_fwd_tuned, tk._m2d_bwd_tuned):
        assert len(tuned.configs) <= 12 and {"R_CLASS", "C_CLASS"} <= set(tuned.keys)
        assert not {"R", "C"} & set(tuned.keys)
    assert tk._size_classes(8000, 8192) == tk._size_classes(8192, 5000) == {"R_CLASS": 8192, "C_CLASS": 8192}


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory):
    """benchmarks/sm90_report.py: every specialisation the launcher launches in its cases, compiled for sm_90
    on the CPU (outside the interpreter, in a subprocess) as Triton's JIT compiles it; its JSON report.
    Skips where this triton ships no ptxas/cuobjdump."""
    from m2d_kernels.backends import triton_kernels as tk

    nvidia_bin = Path(tk.triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (nvidia_bin / "ptxas").exists() or not (nvidia_bin / "cuobjdump").exists():
        pytest.skip("ptxas/cuobjdump not shipped with this triton")
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = tmp_path_factory.mktemp("sm90") / "sm90.json"
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "sm90_report.py"), "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"sm90_report.py wrote no report (exit {result.returncode}): {result.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels natively")
def test_every_launched_specialisation_compiles_for_sm90(sm90_report):
    """Each launch of every case (the worked example, L = 1, one dim, dims not multiples of 16, B < 16, each
    rule and the composer's combinations, symmetric, bf16 and fp32) compiles for sm_90 as launched: Triton's
    binder turns L = 1 into a constant (the teacher's layer index then failed to compile)."""
    rows = sm90_report["kernels"]
    failed = [(row["case"], row["kernel"], row["dtype"], row["error"]) for row in rows if not row["compiled"]]
    assert not failed, failed
    assert {"forward", "backward_dX", "backward_dY"} == {row["kernel"] for row in rows}
    assert any(row["case"] == "teacher-L1" and row["constexprs"].get("L") == 1 and row["constexprs"]["TEACHER"]
               for row in rows), "the teacher with one layer was not compiled with L the constant 1"
    assert sm90_report["backward_flops"] <= 4 * sm90_report["forward_flops"]
    for row in rows:
        if row["case"] == "worked" and row["dtype"] == "bf16":  # the selected plain tiles: tensor cores, 128-bit
            assert row["wgmma"] > 0 and row["async_copies_128"] > 0, row
            if row["kernel"] != "forward":
                assert row["stores_128"] > 0 and row["stores_narrow"] == 0, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels natively")
def test_embeddings_at_an_odd_storage_offset_launch_the_aligned_variant(sm90_report):
    """A storage offset of one element would drop the pointers' divisibility-16 attribute and compile another,
    untested variant: the launcher copies such inputs to an aligned buffer."""
    rows = [row for row in sm90_report["kernels"] if row["case"] == "odd-offset"]
    assert rows
    for row in rows:
        for pointer in ("rows_ptr", "cols_ptr"):
            assert row["attrs"].get(pointer) == [["tt.divisibility", 16]], (row["kernel"], pointer, row["attrs"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels natively")
def test_sm90_shared_tile_backward_configs_do_not_spill(sm90_report):
    """The tiles the launcher selects for the joint directions' shared-tile passes (column statistics,
    triangle, triangle with own-group exclusion) compile for sm_90 without spilling, bf16 and fp32, on tensor
    cores (wgmma or mma.sync). They were chosen on Triton 3.6, the GPU machine's version: register allocation
    moves between releases (3.9 spills 8-40 B in some of them), so other versions skip."""
    from m2d_kernels.backends import triton_kernels as tk

    if not tk.triton.__version__.startswith("3.6."):
        pytest.skip(f"shared-tile tiles tuned on Triton 3.6, this is {tk.triton.__version__}")
    shared = ("worked-q2d-d2q", "worked-q2d-q2q", "worked-joint4")
    rows = [row for row in sm90_report["kernels"] if row["case"] in shared and row["kernel"] != "forward"]
    assert {row["case"] for row in rows} == set(shared)
    for row in rows:
        assert row["spill_bytes"] == 0 and row["wgmma"] + row["mma_sync"] > 0, row


# ---------------------------------------------------------------------------------------
# The pass (backends/base.py): what is Triton's own. Its statistics and gradients under every rule against the
# float64 reference pass are test_passes.py's grid.
# ---------------------------------------------------------------------------------------


def test_pass_rules_errors_name_the_field():
    from m2d_kernels.backends import triton_kernels as tk
    from m2d_kernels.rules import Rules

    rows, cols = make_inputs(1, 3, 6, 48, dtype=FP32, device=DEVICE, seed=23, requires_grad=False)
    positives = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="rules.similarity"):
        tk.row_statistics(rows, cols, (16, 48), ((True, True),), 20.0, positives, Rules(similarity="l2"))
    with pytest.raises(ValueError, match="rules.row_group"):
        tk.row_statistics(rows, cols, (16, 48), ((True, True),), 20.0, positives,
                          Rules(group_period=3, exclude_own_group=True))
    with pytest.raises(ValueError, match="teacher"):
        tk.row_statistics(rows, cols, (16, 48), ((True, False),), 20.0, positives, Rules(teacher=True))


# Shared tiles (rules.triangle, rules.column_statistics): how the triangle's rows and columns compose, the tiles
# it skips, and the forward's limits (cosine, a fixed maximum).
SHARED_DIMS = (8, 20, 48)


@pytest.mark.parametrize("n_cols", [37, 79])
def test_triangle_rows_and_columns_combine_to_the_excluded_pass(n_cols):
    """query_to_query (C = R) and doc_to_doc (C = 2R + 5, own group excluded): row i's statistic over every other
    row is the triangle pass's row_i (+) column_i, equal to the float64 pass scoring each pair twice."""
    from m2d_kernels.backends import reference
    from m2d_kernels.backends import triton_kernels as tk
    from m2d_kernels.rules import Rules

    n_rows = 37
    rows, cols = make_inputs(2, n_rows, n_cols, 48, dtype=FP32, device=DEVICE, seed=33, requires_grad=False)
    cols[:, :n_rows] = rows
    absent = torch.full((n_rows,), -1, device=DEVICE)
    active = ((False, True, True), (True, True, True))
    groups = {"group_period": n_rows, "row_group": torch.arange(n_rows, device=DEVICE), "exclude_own_group": True}
    shared = Rules(triangle=True, column_statistics=n_rows, **(groups if n_cols > n_rows else {}))
    stats = tk.row_statistics(rows, cols, SHARED_DIMS, active, 20.0, absent, shared)
    combined = torch.logaddexp(stats.rows.offset + stats.rows.log_sum, stats.columns.offset + stats.columns.log_sum)
    expected = reference.row_statistics(rows.double().cpu(), cols.double().cpu(), SHARED_DIMS, active, 20.0,
                                        absent.cpu(), Rules(**groups)).rows
    on = torch.tensor(active)[:, None, :].expand_as(combined)
    assert_close(combined.cpu()[on], (expected.offset + expected.log_sum)[on], TF32X3, "row (+) column")


def test_triangle_skips_tiles_below_the_diagonal(monkeypatch):
    """Time-independent: the interpreter's products and exponentials are counted. R = C = 64 is 4 x 4 tiles of
    16, 6 of them wholly below the diagonal: the triangle pass (forward and both backward launches) issues
    10/16 of the plain pass's products, and (forward) no more exponentials than 10 tiles need."""
    if not tk_interpreting():
        pytest.skip("counts the interpreter's operations")
    import triton.runtime.interpreter as interpreter

    from m2d_kernels.backends import triton_kernels as tk
    from m2d_kernels.rules import Rules

    counts = {"dot": 0, "exp2": 0}
    create_dot, create_exp2 = interpreter.InterpreterBuilder.create_dot, interpreter.InterpreterBuilder.create_exp2

    def counting_dot(self, *args):
        counts["dot"] += 1
        return create_dot(self, *args)

    def counting_exp2(self, arg):
        counts["exp2"] += 1
        return create_exp2(self, arg)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_exp2", counting_exp2)
    rows, cols = make_inputs(1, 64, 64, 32, dtype=FP32, device=DEVICE, seed=34, requires_grad=False)
    cols[:] = rows
    absent = torch.full((64,), -1, device=DEVICE)
    active, dims = ((True, True),), (16, 32)
    work = {}
    for name, rules in (("plain", Rules()), ("triangle", Rules(triangle=True))):
        counts.update(dot=0, exp2=0)
        softmax = tk.row_statistics(rows, cols, dims, active, 20.0, absent, rules).rows
        forward = dict(counts)
        counts.update(dot=0, exp2=0)
        tk.pass_gradients(rows, cols, dims, active, 20.0, absent, softmax, torch.ones(1, 2), rules)
        work[name] = (forward, dict(counts))
    (plain_fwd, plain_bwd), (tri_fwd, tri_bwd) = work["plain"], work["triangle"]
    assert plain_fwd["dot"] > 0 and plain_bwd["dot"] > 0
    assert tri_fwd["dot"] * 16 == plain_fwd["dot"] * 10
    assert tri_bwd["dot"] * 16 == plain_bwd["dot"] * 10
    assert tri_fwd["exp2"] * 16 <= plain_fwd["exp2"] * 10


def tk_interpreting() -> bool:
    from m2d_kernels.backends import triton_kernels as tk

    return tk._interpreting()


def test_column_statistics_errors():
    from m2d_kernels.backends import triton_kernels as tk
    from m2d_kernels.rules import Rules

    rows, cols = make_inputs(1, 3, 6, 48, dtype=FP32, device=DEVICE, seed=35, requires_grad=False)
    positives = torch.arange(3, device=DEVICE)
    dims, active = (16, 48), ((True, True),)
    # numerics.FIXED_MAX_SPAN: 2 * scale <= 80 in fp32.
    assert tk.shares_tiles("cos") and tk.shares_tiles("cos", 20.0) and tk.shares_tiles("cos", 40.0)
    assert not tk.shares_tiles("dot") and not tk.shares_tiles("cos", 40.5) and not tk.shares_tiles("cos", 100.0)
    with pytest.raises(ValueError, match="column_statistics needs similarity 'cos' on the triton backend"):
        tk.row_statistics(rows, cols, dims, active, 1.0, positives, Rules(similarity="dot", column_statistics=3))
    with pytest.raises(ValueError, match="rules.column_statistics needs scale"):
        tk.row_statistics(rows, cols, dims, active, 100.0, positives, Rules(column_statistics=3))
    stats = tk.row_statistics(rows, cols, dims, active, 20.0, positives, Rules(column_statistics=3))
    coef = torch.ones(1, 2, device=DEVICE)
    with pytest.raises(ValueError, match="columns .* are required with rules.column_statistics"):
        tk.pass_gradients(rows, cols, dims, active, 20.0, positives, stats.rows, coef, Rules(column_statistics=3))
    two_columns = Softmax(stats.columns.offset[:, :2], stats.columns.log_sum[:, :2])
    with pytest.raises(ValueError, match=r"columns.offset must have shape \(1, 3, 2\)"):
        tk.pass_gradients(rows, cols, dims, active, 20.0, positives, stats.rows, coef, Rules(column_statistics=3),
                          columns=two_columns)
    with pytest.raises(ValueError, match="scale_slope"):
        tk.row_statistics(rows, cols, dims, active, 20.0, positives, Rules(scale_slope=True))


# ---------------------------------------------------------------------------------------
# The launcher as a GPU will run it: device, host traffic, autotuning, scratch, operands
# ---------------------------------------------------------------------------------------

# Calls of the public function that reach every launcher path: the fused default, symmetric, the shared tiles,
# a guide (rules with a threshold) and distillation (the teacher).
LAUNCHER_CALLS = [
    dict(),
    dict(symmetric=True),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
    dict(directions=("query_to_doc", "query_to_query"), guide="yes"),
    dict(distill_weights=[[1.0, 0.5], [0.0, 1.0]]),
]


def _launcher_call(options, seed=0):
    queries, docs = make_inputs(2, 5, 10, 32, dtype=torch.float32, device=DEVICE, seed=seed)
    queries, docs = queries.requires_grad_(), docs.requires_grad_()
    options = dict(options)
    if options.get("guide"):
        generator = torch.Generator().manual_seed(seed)
        options["guide"] = (torch.randn(5, 8, generator=generator).to(DEVICE),
                            torch.randn(10, 8, generator=generator).to(DEVICE))
    loss = m2d.matryoshka_2d_infonce(queries, docs, (16, 32), backend="triton", **options)
    loss.backward()
    return queries.device


class _RecordingKernel:
    """Stands in for a kernel: records whether each launch happens under the device guard, then launches."""

    def __init__(self, kernel, guarded, launches):
        self.kernel, self.guarded, self.launches = kernel, guarded, launches

    def __getitem__(self, grid):
        self.launches.append(list(self.guarded))
        return self.kernel[grid]


@pytest.mark.parametrize("options", LAUNCHER_CALLS, ids=lambda o: "-".join(o) or "default")
def test_every_launch_runs_under_the_guard_of_its_tensors_device(options, monkeypatch):
    """Inputs on a GPU other than the current one must launch there (DDP-style per-rank devices)."""
    from m2d_kernels.backends import triton_kernels as tk

    guarded, launches = [], []
    real_guard = tk._on_device

    class Guard:
        def __init__(self, device):
            self.device, self.inner = device, real_guard(device)

        def __enter__(self):
            guarded.append(self.device)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            guarded.pop()
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(tk, "_on_device", Guard)
    for name in ("_m2d_fwd_kernel", "_m2d_bwd_kernel"):
        monkeypatch.setattr(tk, name, _RecordingKernel(getattr(tk, name), guarded, launches))
    device = _launcher_call(options)
    assert launches and all(state == [device] for state in launches), launches
    guard = real_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("options", LAUNCHER_CALLS, ids=lambda o: "-".join(o) or "default")
def test_a_steady_state_call_copies_nothing_from_the_host(options, monkeypatch):
    """The second call of a training step: no host-to-device table (``torch.tensor``) and no read back to the
    host (``item``, ``tolist``, ``cpu``) from the library's code; each would stall the GPU's queue or break a
    CUDA-graph capture. (A given ``positive_index`` is range-checked with one read: not used here.)"""
    package = str(Path(m2d.__file__).parent)
    _launcher_call(options)  # the first call fills the caches
    calls = []

    def recorded(name, function):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                calls.append(f"{name} from {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "tensor", recorded("torch.tensor", torch.tensor))
    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, recorded(f"Tensor.{name}", getattr(torch.Tensor, name)))
    _launcher_call(options)
    assert calls == []


def test_autotuning_resets_the_column_sums_before_every_run():
    """The forward adds the column statistics atomically: the autotuner's trial runs would otherwise add into
    the sums the chosen run returns."""
    from m2d_kernels.backends import triton_kernels as tk

    assert tk._m2d_fwd_tuned.reset_to_zero == ["col_sum_ptr"]
    assert "col_sum_ptr" in tk._m2d_fwd_kernel.arg_names
    assert not tk._m2d_bwd_tuned.reset_to_zero  # the backward overwrites everything it writes


def test_each_backward_tile_gets_its_own_number_of_persistent_programs():
    """Scratch is sized per tile (autotuning's 128 x 128 candidates no longer cap every tile at 46 of 132 SMs):
    at the worked example (D = 768, 6 dims) 64 x 64 tiles get 120 programs within the L2 budget."""
    from m2d_kernels.backends import triton_kernels as tk

    assert tk._backward_programs(64, 64, 768, 6, 132) == 120
    assert tk._backward_programs(128, 128, 768, 6, 132) == 46
    assert tk._backward_programs(32, 32, 64, 2, 132) == 132  # small tiles: one per SM
    assert tk._backward_programs(128, 128, 1 << 20, 6, 132) == 1  # at least one


def test_operands_are_aligned_and_within_int32_offsets():
    from m2d_kernels.backends import triton_kernels as tk

    flat = torch.randn(1 + 2 * 8 * 16, dtype=torch.bfloat16)
    odd = flat[1:].view(2, 8, 16)
    assert odd.is_contiguous() and odd.data_ptr() % 16 != 0
    aligned = tk._operand(odd, "queries")
    assert aligned.data_ptr() % 16 == 0 and torch.equal(aligned, odd)
    even = torch.randn(2, 8, 16)
    assert tk._operand(even, "queries") is even  # nothing copied when already fine
    too_large = torch.zeros(1, 1, 1).expand(1, 2**21, 1024)  # 2^31 elements per layer, nothing allocated
    with pytest.raises(ValueError, match=r"docs \(columns\): the triton backend indexes a layer with int32"):
        tk._operand(too_large, "docs (columns)")
