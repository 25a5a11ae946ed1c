"""Backend ``cpp`` (csrc/m2d_cpu.cpp) against the ``reference`` backend and the NumPy oracle.

The first use compiles the extension (about a minute) unless ``m2d_kernels._C`` was built
ahead of time; tests that need it skip with the compiler's reason when it cannot be built.
Shapes cross the kernel's tile edges (64 query rows, 512 candidate columns) on purpose.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
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
from m2d_kernels import backends
from m2d_kernels.backends import cpp

needs_extension = pytest.mark.skipif(
    cpp.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"cpp backend unavailable: {cpp.unavailable_reason(torch.device('cpu'))}",
)

# (L, B, N, D, dims): B = 1, 3, 37, 130; N = 3B hard negatives; dims not multiples of 16;
# 130 x 600 spans three row blocks and two column tiles.
SHAPES = [
    (2, 1, 3, 48, (24, 40, 48)),
    (2, 3, 9, 100, (24, 40, 100)),
    (3, 37, 111, 100, (24, 40, 100)),
    (2, 130, 600, 48, (10, 30, 48)),
]


def _zero_some_weights(n_layers, n_dims, generator):
    weights = torch.rand(n_layers, n_dims, generator=generator, dtype=torch.float64) + 0.5
    weights[0, 0] = 0.0  # a pair below an active one: its segment still feeds larger dims
    if n_layers > 2:
        weights[1] = 0.0  # a whole layer off
    return weights


@needs_extension
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-B{}-N{}-D{}".format(*s[:4]))
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_float64_matches_reference(shape, symmetric, scale):
    n_layers, n_queries, n_docs, n_features, dims = shape
    seed = sum(shape[:4]) + int(scale) + symmetric
    queries, docs = make_inputs(n_layers, n_queries, n_docs, n_features, seed=seed)
    weights = _zero_some_weights(n_layers, len(dims), torch.Generator().manual_seed(seed))
    kwargs = dict(scale=scale, symmetric=symmetric)
    expected = loss_and_grads(queries, docs, dims, weights, backend="reference", **kwargs)
    got = loss_and_grads(queries, docs, dims, weights, backend="cpp", **kwargs)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected, strict=True):
        assert_close(g, e, torch.float64, name)
    pair_losses = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, reduction="none", backend="cpp", **kwargs)
    oracle = oracle_pair_losses(queries, docs, dims, weights, **kwargs)
    np.testing.assert_allclose(pair_losses.detach().numpy(), oracle, atol=1e-9, rtol=1e-9)


@needs_extension
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_positive_index_matches_reference(symmetric):
    queries, docs = make_inputs(2, 37, 600, 100, seed=3)
    # Shuffled positives, some shared by two queries, spread over both column tiles.
    positive_index = torch.randperm(600, generator=torch.Generator().manual_seed(4))[:37]
    positive_index[5] = positive_index[6]
    kwargs = dict(positive_index=positive_index, symmetric=symmetric, scale=30.0)
    expected = loss_and_grads(queries, docs, (24, 40, 100), backend="reference", **kwargs)
    got = loss_and_grads(queries, docs, (24, 40, 100), backend="cpp", **kwargs)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected, strict=True):
        assert_close(g, e, torch.float64, name)


@needs_extension
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_float32_within_tolerance_of_float64_reference(symmetric):
    queries, docs = make_inputs(2, 130, 600, 100, seed=5)
    dims = (24, 40, 100)
    expected = loss_and_grads(queries, docs, dims, backend="reference", symmetric=symmetric)
    got = loss_and_grads(queries.float(), docs.float(), dims, backend="cpp", symmetric=symmetric)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected, strict=True):
        assert g.dtype == torch.float32, f"{name} has dtype {g.dtype}"
        assert_close(g, e, torch.float32, name)


@needs_extension
def test_float32_exact_when_exponentials_underflow():
    # All cosines near -1 at scale 100: exp(scale * (cos - 1)) underflows in fp32, so a
    # fixed maximum of `scale` would give log(0); the running maximum must stay exact.
    queries, docs = make_inputs(1, 37, 111, 48, seed=6)
    docs = (-queries.detach()[:, :1] + 0.05 * docs.detach()).expand(-1, 111, -1).contiguous()
    expected = loss_and_grads(queries, docs, (24, 48), backend="reference", scale=100.0, symmetric=True)
    got = loss_and_grads(queries.float(), docs.float(), (24, 48), backend="cpp", scale=100.0, symmetric=True)
    assert torch.isfinite(got[0])
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected, strict=True):
        assert_close(g, e, torch.float32, name)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(dtype):
    queries, docs = make_inputs(2, 37, 111, 100, seed=7)
    assert_within_twice_reference_error("cpp", queries, docs, (24, 40, 100), dtype, symmetric=True)


@needs_extension
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_largest_active_dim_below_full_width_matches_reference(symmetric):
    # Layer 0 stops at the middle dim, layer 1 is off, layer 2 skips the middle dim: the
    # features beyond a layer's largest active dim get exactly zero gradient.
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5]], dtype=torch.float64)
    for n_queries, n_docs in ((5, 10), (70, 600)):
        queries, docs = make_inputs(3, n_queries, n_docs, 40, seed=n_queries)
        kwargs = dict(scale=20.0, symmetric=symmetric)
        expected = loss_and_grads(queries, docs, (8, 24, 40), weights, backend="reference", **kwargs)
        got = loss_and_grads(queries, docs, (8, 24, 40), weights, backend="cpp", **kwargs)
        for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected, strict=True):
            assert_close(g, e, torch.float64, name)


@needs_extension
def test_result_independent_of_thread_count():
    queries, docs = make_inputs(2, 130, 1100, 100, seed=8)
    weights = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 1.0]])
    kwargs = dict(backend="cpp", symmetric=True, scale=50.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = loss_and_grads(queries, docs, (24, 40, 100), weights, **kwargs)
        torch.set_num_threads(max(2, threads))
        several = loss_and_grads(queries, docs, (24, 40, 100), weights, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("loss", "grad_queries", "grad_docs"), single, several, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")  # bitwise


@needs_extension
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_gradcheck(symmetric):
    queries, docs = make_inputs(2, 3, 7, 8, seed=9)
    weights = torch.tensor([[1.0, 0.5], [0.0, 2.0]], dtype=torch.float64)
    positive_index = torch.tensor([2, 0, 5])

    def loss(q, d):
        return m2d.matryoshka_2d_infonce(
            q, d, (3, 8), weights, scale=5.0, positive_index=positive_index, symmetric=symmetric, backend="cpp"
        )

    assert torch.autograd.gradcheck(loss, (queries, docs))


@needs_extension
def test_nan_propagates():
    queries, docs = make_inputs(1, 3, 9, 48, seed=10)
    queries = queries.detach().clone()
    queries[0, 1, 5] = float("nan")
    loss = m2d.matryoshka_2d_infonce(queries, docs, (24, 48), backend="cpp")
    assert torch.isnan(loss)


@needs_extension
def test_auto_picks_cpp_for_cpu_tensors():
    assert backends.resolve("auto", torch.device("cpu")) is cpp
    assert "cpp" in m2d.available_backends()


def test_unavailable_on_cuda_tensors():
    assert cpp.unavailable_reason(torch.device("cuda")) == "cpp backend runs on CPU tensors"
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        backends.resolve("cpp", torch.device("cuda"))


def test_failed_build_reports_compiler_reason(monkeypatch):
    def failing_compile():
        raise RuntimeError("Error building extension 'm2d_kernels_cpu'\nm2d_cpu.cpp:1:1: error: no compiler here")

    monkeypatch.setattr(cpp, "_compile", failing_compile)
    monkeypatch.setitem(sys.modules, "m2d_kernels._C", None)  # no ahead-of-time build
    module, reason = cpp._extension.__wrapped__()
    assert module is None
    assert "error: no compiler here" in reason


def test_failed_build_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpp, "_extension", lambda: (None, "building the C++ extension failed: boom"))
    monkeypatch.setattr(backends, "_warned_fallbacks", set())
    queries, docs = make_inputs(1, 3, 9, 48, seed=11)
    with pytest.warns(UserWarning, match="'cpp' is unavailable, falling back: building the C\\+\\+ extension failed"):
        assert backends.resolve("auto", torch.device("cpu")) is backends.resolve("torch", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available on cpu: building .* failed: boom"):
        m2d.matryoshka_2d_infonce(queries, docs, (24, 48), backend="cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second fallback must stay silent
        loss = m2d.matryoshka_2d_infonce(queries, docs, (24, 48), backend="auto")
    expected = loss_and_grads(queries, docs, (24, 48), backend="reference")[0]
    assert_close(loss.detach(), expected, torch.float64, "loss")


# ---------------------------------------------------------------- issue 20: strides, double backward, scale


@needs_extension
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("layout", ["expanded", "column-of-stacked", "strided-inputs"])
def test_any_strides_match_reference(layout, symmetric):
    n_queries, n_docs = 70, 600
    queries, docs = make_inputs(2, n_queries, n_docs, 48, seed=12)
    if layout == "expanded":
        positive_index = torch.tensor([513]).expand(n_queries)  # stride 0, in the second column tile
    else:
        shuffled = torch.randperm(n_docs, generator=torch.Generator().manual_seed(1))[:n_queries]
        stacked = torch.stack([torch.arange(n_queries), shuffled], dim=1)
        positive_index = stacked[:, 1]  # stride 2
    if layout == "strided-inputs":
        # Non-contiguous leaves: every other feature of a wider tensor, layers swapped in memory.
        queries = torch.cat([queries.detach()] * 2, -1)[..., ::2].transpose(0, 1).contiguous().transpose(0, 1)
        docs = torch.cat([docs.detach(), docs.detach()], -1)[..., ::2]
        assert not queries.is_contiguous() and not docs.is_contiguous()
    kwargs = dict(positive_index=positive_index, symmetric=symmetric, scale=30.0)
    expected = loss_and_grads(queries, docs, (16, 48), backend="reference", **kwargs)
    got = loss_and_grads(queries, docs, (16, 48), backend="cpp", **kwargs)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected, strict=True):
        assert_close(g, e, torch.float64, name)


@needs_extension
def test_double_backward_raises_instead_of_first_order_result():
    queries, docs = make_inputs(1, 5, 9, 16, seed=13)
    loss = m2d.matryoshka_2d_infonce(queries, docs, (8, 16), backend="cpp")
    grad = torch.autograd.grad(loss, queries, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="first derivatives only; a second derivative"):
        grad.sum().backward()
    # A gradient penalty added to the loss must not silently lose its second-order part either.
    loss = m2d.matryoshka_2d_infonce(queries, docs, (8, 16), backend="cpp")
    grad = torch.autograd.grad(loss, queries, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="first derivatives only; a second derivative"):
        (loss + grad.square().sum()).backward()


def _oracle_dloss_dscale(queries, docs, dims, scale, positive_index, symmetric):
    """d loss_lm / d scale by float64 autograd through a naive implementation (no backend code)."""
    scale_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    out = torch.zeros(queries.shape[0], len(dims), dtype=torch.float64)
    rows = torch.arange(queries.shape[1])
    for layer in range(queries.shape[0]):
        for m, d in enumerate(dims):
            q = queries[layer, :, :d].double()
            k = docs[layer, :, :d].double()
            cos = (q / q.norm(dim=1, keepdim=True)) @ (k / k.norm(dim=1, keepdim=True)).T
            logits = scale_t * cos
            loss = (logits.logsumexp(1) - logits[rows, positive_index]).mean()
            if symmetric:
                columns = logits[:, positive_index]
                loss = (loss + (columns.logsumexp(0) - logits[rows, positive_index]).mean()) / 2
            out[layer, m] = torch.autograd.grad(loss, scale_t)[0]
    return out


@needs_extension
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("scale", [20.0, 300.0], ids=["fixed-max", "running-max"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scale_grad_matches_autograd_oracle(dtype, scale, symmetric):
    queries, docs = make_inputs(2, 70, 600, 48, seed=14, requires_grad=False)
    positive_index = torch.randperm(600, generator=torch.Generator().manual_seed(15))[:70]
    positive_index[3] = positive_index[4]
    dims, active = (16, 32, 48), ((True, False, True), (True, True, True))
    losses, dloss_dscale = cpp.pair_losses(queries.to(dtype), docs.to(dtype), dims, active, scale, positive_index,
                                           symmetric, scale_grad=True)
    expected = _oracle_dloss_dscale(queries, docs, dims, scale, positive_index, symmetric)
    expected[0, 1] = 0.0  # inactive pair
    assert dloss_dscale.dtype == dtype and not dloss_dscale.requires_grad
    atol, rtol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4)
    torch.testing.assert_close(dloss_dscale.double(), expected, atol=atol, rtol=rtol)
    # The default path returns the losses alone, equal to the scale_grad path's.
    plain = cpp.pair_losses(queries.to(dtype), docs.to(dtype), dims, active, scale, positive_index, symmetric)
    torch.testing.assert_close(plain, losses, atol=0, rtol=0)


# Bounds against the float64 reference: loss relative error and max-abs gradient error over the
# largest gradient. Scales up to 1e8 (fp32) and 1e16 (fp64) are claimed; beyond, finite.
SCALE_BOUNDS = {torch.float32: (1e-4, (1.0, 20.0, 100.0, 1e4, 1e8)), torch.float64: (1e-9, (1.0, 20.0, 1e4, 1e16))}


@needs_extension
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_scales_within_bound_of_reference(dtype, symmetric):
    bound, scales = SCALE_BOUNDS[dtype]
    queries, docs = make_inputs(2, 70, 600, 48, seed=16)
    # The reference sees exactly the rounded inputs the backend sees.
    queries64, docs64 = queries.detach().to(dtype).double(), docs.detach().to(dtype).double()
    for scale in scales:
        kwargs = dict(scale=scale, symmetric=symmetric)
        expected = loss_and_grads(queries64, docs64, (16, 48), backend="reference", **kwargs)
        got = loss_and_grads(queries64.to(dtype), docs64.to(dtype), (16, 48), backend="cpp", **kwargs)
        loss_error = ((got[0].double() - expected[0]) / expected[0]).abs().item()
        assert loss_error <= bound, f"scale {scale}: loss relative error {loss_error:.2e}"
        for name, g, e in zip(("grad_queries", "grad_docs"), got[1:], expected[1:], strict=True):
            error = ((g.double() - e).abs().max() / e.abs().max()).item()
            assert error <= bound, f"scale {scale}: {name} error {error:.2e} relative to its largest entry"


@needs_extension
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e10), (torch.float64, 1e20)])
def test_beyond_claimed_scales_stays_finite(dtype, scale):
    queries, docs = make_inputs(1, 70, 600, 48, dtype=dtype, seed=17)
    loss, grad_queries, grad_docs = loss_and_grads(queries, docs, (16, 48), backend="cpp", scale=scale, symmetric=True)
    assert torch.isfinite(loss) and torch.isfinite(grad_queries).all() and torch.isfinite(grad_docs).all()


# ---------------------------------------------------------------- the JIT build: folder, flags, lock


def test_build_folder_keyed_by_torch_flags_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("M2D_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("M2D_NATIVE", raising=False)
    source = tmp_path / "m2d_cpu.cpp"
    source.write_text("// version 1\n")
    default = cpp.build_directory(source)
    assert default.parent == tmp_path and default == cpp.build_directory(source)  # stable
    assert "-march=native" not in cpp.build_flags()[0]  # portable unless asked
    monkeypatch.setenv("M2D_NATIVE", "1")
    assert "-march=native" in cpp.build_flags()[0]
    native = cpp.build_directory(source)
    monkeypatch.delenv("M2D_NATIVE")
    source.write_text("// version 2\n")
    edited = cpp.build_directory(source)
    source.write_text("// version 1\n")
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    other_torch = cpp.build_directory(source)
    assert len({default, native, edited, other_torch}) == 4


def _hold_build_lock(folder):
    """Child process: take the build lock, say so, then wait to be killed."""
    code = (
        "import sys, time; from pathlib import Path; from m2d_kernels.backends import cpp\n"
        "with cpp.build_lock(Path(sys.argv[1]), 5):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert child.stdout.readline().strip() == "locked"
    return child


@pytest.mark.skipif(cpp.fcntl is None, reason="flock needs a POSIX system")
def test_build_lock_of_a_killed_process_does_not_block(tmp_path):
    child = _hold_build_lock(tmp_path)
    child.kill()  # like a build killed midway
    child.wait()
    (tmp_path / "lock").write_text("")  # torch's own lock file, which a killed build leaves behind
    start = time.monotonic()
    with cpp.build_lock(tmp_path, timeout_s=30):
        assert not (tmp_path / "lock").exists()  # torch would wait on it forever
    assert time.monotonic() - start < 5


@pytest.mark.skipif(cpp.fcntl is None, reason="flock needs a POSIX system")
def test_build_lock_held_by_a_live_process_times_out_with_a_clear_message(tmp_path):
    child = _hold_build_lock(tmp_path)
    try:
        with pytest.raises(TimeoutError, match=f"waiting for process {child.pid} .*M2D_BUILD_TIMEOUT"):
            with cpp.build_lock(tmp_path, timeout_s=0.5):
                pass
    finally:
        child.kill()
        child.wait()


def test_compile_removes_stale_torch_lock_and_announces_once(monkeypatch, tmp_path, capsys):
    """A folder left by a build killed midway: no done-marker and torch's lock file. The build
    must start (not wait), print one line, and mark the folder complete."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("M2D_BUILD_DIR", str(tmp_path))
    folder = cpp.build_directory(cpp._source_path())
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")
    built = []

    def fake_load(**kwargs):
        assert not (folder / "lock").exists(), "torch's stale lock would make load() wait forever"
        assert kwargs["build_directory"] == str(folder) and "-march=native" not in kwargs["extra_cflags"]
        built.append(kwargs["name"])
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert cpp._compile() == "module"
    assert built == [cpp.EXTENSION_NAME] and (folder / cpp.DONE_NAME).is_file()
    messages = capsys.readouterr().err.strip().splitlines()
    assert len(messages) == 1 and messages[0].startswith("m2d-kernels: compiling the C++ backend into")


def test_missing_ninja_is_named(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("M2D_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match="ninja is not installed"):
        cpp._compile()


# ---------------------------------------------------------------- memory: linear in the batch


@needs_extension
def test_extra_memory_grows_at_most_linearly_with_the_batch(monkeypatch):
    """Peak extra memory (gradients included) of one forward+backward, each size in a fresh
    process. Quadratic growth (anything of size B x N or (N / tile) x B x D) quadruples per
    doubling; linear growth at most doubles."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from memory_scaling import measure_in_fresh_process

    small, large = (measure_in_fresh_process("cpp", 1, b, 2 * b, 128, (32, 64, 128), reps=0) for b in (1024, 4096))
    assert small["peak_extra_bytes"] is not None, "peak memory is measured on Linux only"
    growth = large["peak_extra_bytes"] / small["peak_extra_bytes"]
    assert growth <= 4 * 1.25, f"extra memory grew {growth:.1f}x for 4x the batch: {small} -> {large}"
    assert large["peak_extra_bytes"] <= 2.5 * large["input_bytes"], large
