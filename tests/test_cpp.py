"""Backend ``cpp`` (csrc/m2d_cpu.cpp) against the ``reference`` backend and the NumPy oracle.

The first use compiles the extension (about a minute) unless ``m2d_kernels._C`` was built
ahead of time; tests that need it skip with the compiler's reason when it cannot be built.
Shapes cross the kernel's tile edges (64 query rows, 512 candidate columns) on purpose.
"""

from __future__ import annotations

import dataclasses
import json
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
    SHARED_PASS_MODES,
    assert_close,
    assert_within_twice_reference_error,
    loss_and_grads,
    make_inputs,
    oracle_pair_losses,
)
from test_passes import check_pass

import m2d_kernels as m2d
from m2d_kernels import backends
from m2d_kernels.backends import cpp
from m2d_kernels.backends.base import Softmax, combine
from m2d_kernels.rules import Rules

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
def test_learnable_scale_gradient_matches_autograd_oracle(dtype, scale, symmetric):
    """A learnable temperature (a scale tensor that requires grad) through the public function: its gradient of
    a random weighting of the [L, M] losses against float64 autograd through a naive implementation."""
    queries, docs = make_inputs(2, 70, 600, 48, seed=14, requires_grad=False)
    positive_index = torch.randperm(600, generator=torch.Generator().manual_seed(15))[:70]
    positive_index[3] = positive_index[4]
    dims = (16, 32, 48)
    weights = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=dtype)  # an inactive pair
    mix = torch.rand(2, 3, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    scale_param = torch.tensor(scale, dtype=dtype, requires_grad=True)
    losses = m2d.matryoshka_2d_infonce(queries.to(dtype), docs.to(dtype), dims, weights, scale=scale_param,
                                       positive_index=positive_index, symmetric=symmetric, reduction="none",
                                       backend="cpp")
    (losses * mix.to(dtype)).sum().backward()
    expected = _oracle_dloss_dscale(queries.to(dtype), docs.to(dtype), dims, scale, positive_index, symmetric)
    expected[0, 1] = 0.0  # inactive pair
    atol, rtol = (1e-10, 1e-9) if dtype == torch.float64 else (1e-5, 1e-4)
    torch.testing.assert_close(scale_param.grad.double(), (expected * mix).sum(), atol=atol, rtol=rtol)
    # The losses themselves: those of a fixed scale.
    fixed = m2d.matryoshka_2d_infonce(queries.to(dtype), docs.to(dtype), dims, weights, scale=scale,
                                      positive_index=positive_index, symmetric=symmetric, reduction="none",
                                      backend="reference")
    assert_close(losses.detach(), fixed, dtype, "losses")


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
    monkeypatch.delenv("M2D_ISA", raising=False)
    source = tmp_path / "m2d_cpu.cpp"
    source.write_text("// version 1\n")
    default = cpp.build_directory(source)
    assert default.parent == tmp_path and default == cpp.build_directory(source)  # stable
    assert "-march=native" not in cpp.build_flags()[0]  # portable unless asked
    monkeypatch.setenv("M2D_ISA", "native")
    assert "-march=native" in cpp.build_flags()[0]
    real_cpu_flags = cpp._cpu_flags
    monkeypatch.setattr(cpp, "_cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    # 512-bit vectors where the CPU has them.
    assert cpp.build_flags()[0][-2:] == ["-march=native", "-mprefer-vector-width=512"]
    monkeypatch.setattr(cpp, "_cpu_flags", lambda: {"avx2", "fma"})
    assert cpp.build_flags()[0][-1] == "-march=native"
    monkeypatch.setattr(cpp, "_cpu_flags", real_cpu_flags)
    native = cpp.build_directory(source)
    monkeypatch.setenv("M2D_ISA", "baseline")
    assert not any(flag.startswith(("-mavx", "-march")) for flag in cpp.build_flags()[0])
    baseline = cpp.build_directory(source)
    monkeypatch.delenv("M2D_ISA")
    source.write_text("// version 2\n")
    edited = cpp.build_directory(source)
    source.write_text("// version 1\n")
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    other_torch = cpp.build_directory(source)
    assert len({default, native, baseline, edited, other_torch}) == 5


@pytest.mark.parametrize("value, message", [("sse9", "M2D_ISA must be one of"), ("avx512", "lacks")])
def test_isa_must_be_known_and_supported_by_the_cpu(monkeypatch, value, message):
    """M2D_ISA names an ISA of cpp.ISA_FLAGS that this CPU has: a ValueError naming the variable otherwise."""
    monkeypatch.setenv("M2D_ISA", value)
    if value == "avx512":  # pretend a CPU without AVX-512
        monkeypatch.setattr(cpp, "_cpu_flags", lambda: {"avx2", "fma"})
        monkeypatch.setattr(cpp.platform, "machine", lambda: "x86_64")
    with pytest.raises(ValueError, match=message):
        cpp.build_flags()


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
        (folder / cpp.LIBRARY_NAME).write_bytes(b"a library")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert cpp._compile() == "module"
    assert built == [cpp.EXTENSION_NAME] and (folder / cpp.DONE_NAME).is_file()
    messages = capsys.readouterr().err.strip().splitlines()
    assert len(messages) == 1 and messages[0].startswith("m2d-kernels: compiling the C++ backend into")


def _fake_build(monkeypatch, tmp_path, root=None):
    """(build folder, list of builds, list of loads) with torch's build and the library's import replaced."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("M2D_BUILD_DIR", str(root or tmp_path))
    folder = cpp.build_directory(cpp._source_path())
    builds, loads = [], []

    def fake_load(**kwargs):
        builds.append(sorted(p.name for p in folder.iterdir()))
        (folder / cpp.LIBRARY_NAME).write_bytes(b"the freshly built library")
        return "built module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp, "_load_built", lambda folder: loads.append(folder) or "loaded module")
    return folder, builds, loads


def _marker_for(data: bytes) -> str:
    return __import__("json").dumps({"size": len(data), "sha256": __import__("hashlib").sha256(data).hexdigest()})


@pytest.mark.parametrize("damage", ["truncated", "empty", "legacy_marker"])
def test_a_damaged_library_is_rebuilt_not_loaded(monkeypatch, tmp_path, damage):
    """A library cut short (a crash mid-write; loading it was SIGBUS) or empty (which fell back to torch
    forever) does not match its marker's size and SHA-256: it is rebuilt under the lock, then recorded."""
    folder, builds, loads = _fake_build(monkeypatch, tmp_path)
    folder.mkdir(parents=True, mode=0o700)
    complete = b"\x7fELF" + bytes(4096)
    library = {"truncated": complete[:100], "empty": b"", "legacy_marker": b""}[damage]
    (folder / cpp.LIBRARY_NAME).write_bytes(library)
    (folder / "m2d_cpu.o").write_bytes(b"an object file ninja would trust")
    (folder / cpp.DONE_NAME).write_text("" if damage == "legacy_marker" else _marker_for(complete))
    assert cpp._compile() == "built module" and loads == []
    assert builds == [[cpp.LOCK_NAME]], "the damaged build's files must go, or ninja keeps the library"
    assert (folder / cpp.DONE_NAME).read_text() == _marker_for(b"the freshly built library")
    assert cpp._compile() == "loaded module" and loads == [folder]  # the next process loads it, unbuilt
    assert len(builds) == 1


def test_a_library_planted_in_a_shared_root_is_refused(monkeypatch, tmp_path):
    """A world-writable root (/tmp, a CI cache) and a predictable key: a folder someone else can write is
    never loaded from, even with a matching marker, and nothing is built into it."""
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    folder, builds, loads = _fake_build(monkeypatch, tmp_path, root)
    folder.mkdir()
    planted = b"another user's library"
    (folder / cpp.LIBRARY_NAME).write_bytes(planted)
    (folder / cpp.DONE_NAME).write_text(_marker_for(planted))
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match=f"build folder {folder}: it is writable by others .*M2D_BUILD_DIR"):
        cpp._compile()
    folder.chmod(0o755)
    (folder / cpp.LIBRARY_NAME).chmod(0o666)
    with pytest.raises(PermissionError, match="library .* it is writable by others"):
        cpp._compile()
    if os.getuid() == 0:  # as root the planted library can also belong to another user
        (folder / cpp.LIBRARY_NAME).chmod(0o644)
        os.chown(folder / cpp.LIBRARY_NAME, 12345, -1)
        with pytest.raises(PermissionError, match="it belongs to user id 12345"):
            cpp._compile()
    assert builds == [] and loads == []


def test_a_new_build_folder_is_private(monkeypatch, tmp_path):
    folder, builds, loads = _fake_build(monkeypatch, tmp_path)
    previous = os.umask(0)
    try:
        assert cpp._compile() == "built module"
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(cpp.fcntl is None, reason="flock needs a POSIX system")
def test_build_lock_never_writes_through_a_link(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("a user's data")
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / cpp.LOCK_NAME).symlink_to(precious)
    with pytest.raises(OSError, match="is a symbolic link"), cpp.build_lock(folder, 1):
        pass
    assert precious.read_text() == "a user's data"


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_build_timeout_must_be_finite(monkeypatch, value):
    monkeypatch.setenv("M2D_BUILD_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"M2D_BUILD_TIMEOUT must be a finite number of seconds >= 0, got '{value}'"):
        cpp.build_timeout()


def test_missing_ninja_is_named(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("M2D_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match="ninja is not installed"):
        cpp._compile()


# ---------------------------------------------------------------- the pass with rules (rules.py)
#
# row_statistics / pass_gradients of the cpp pass against the float64 reference pass (the oracle of
# every rule), for each rule alone and combined, teacher on and off, odd shapes and scales.


def _unit(n, width, generator):
    return torch.nn.functional.normalize(torch.randn(n, width, generator=generator, dtype=torch.float64), dim=-1)


def _rules_case(case, n_rows, n_cols, generator):
    """(rules, positives, n_cols) of a named case; positives -1 where a row's positive is not a column."""
    groups = dict(group_period=n_rows, row_group=torch.arange(n_rows))
    positives = torch.arange(n_rows)
    similarity = "dot" if case.startswith("dot") else "cos"
    if case in ("cos", "dot"):
        return Rules(similarity=similarity), positives, n_cols
    if case.endswith("self"):  # query_to_query: the row itself excluded (G = R = C)
        return Rules(similarity=similarity, exclude_own_group=True, **groups), torch.full((n_rows,), -1), n_rows
    if case == "groups":  # doc_to_doc: the row's whole group excluded (C = 3G)
        return Rules(exclude_own_group=True, **groups), torch.full((n_rows,), -1), 3 * n_rows
    if case.startswith(("penalty", "dot-penalty")):  # penalty-<mode>-<strength>
        mode, strength = case.rsplit("-", 2)[-2:]
        mode = {"batch": "in_batch_negatives", "hard": "hard_negatives", "all": "all_negatives"}[mode]
        return Rules(similarity=similarity, penalty=mode, penalty_strength=float(strength), **groups), positives, \
            3 * n_rows
    if case.startswith(("guided", "dot-guided")):
        guide_rows, guide_cols = _unit(n_rows, 7, generator), _unit(n_cols, 7, generator)
        # Halfway between two middle guide similarities of the row: about half the columns masked, and no
        # similarity within rounding of the threshold (a tie would flip with the product's summation order).
        middle = (guide_rows @ guide_cols.T).sort(1).values[:, (n_cols - 1) // 2:(n_cols - 1) // 2 + 2]
        threshold = middle.mean(1) if n_cols > 1 else middle[:, 0] - 0.1
        if n_rows > 1:  # a row whose every column is masked: no positive here, threshold below any cosine
            threshold[1] = -2.0
            positives = positives.clone()
            positives[1] = -1
        extra = dict(penalty="in_batch_negatives", penalty_strength=0.5, **groups) if case.endswith("penalty") else {}
        return Rules(similarity=similarity, guide_rows=guide_rows, guide_cols=guide_cols, guide_threshold=threshold,
                     **extra), positives, n_cols
    raise AssertionError(case)


@needs_extension
def test_pass_with_every_rule_independent_of_thread_count():
    generator = torch.Generator().manual_seed(4)
    rules, positives, n_cols = _rules_case("guided-penalty", 130, 600, generator)
    rules = dataclasses.replace(rules, teacher=True)
    rows, cols = make_inputs(2, 130, n_cols, 100, seed=5, requires_grad=False)
    dims, active = (24, 40, 100), ((True, False, True), (True, True, True))
    coef, distill = torch.rand(2, 3, generator=generator), torch.rand(2, 3, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            stats = cpp.row_statistics(rows, cols, dims, active, 50.0, positives, rules)
            grads = cpp.pass_gradients(rows, cols, dims, active, 50.0, positives, stats.rows, coef, rules, distill)
            results.append((stats.rows.offset, stats.rows.log_sum, stats.positive_logit, stats.teacher_sum,
                            grads.rows, grads.cols))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # bitwise


def test_pass_rules_errors_name_the_rule():
    with pytest.raises(ValueError, match="rules.similarity"):
        cpp._rule_arguments(Rules(similarity="l2"), torch.float64, 3, 6)
    with pytest.raises(ValueError, match="rules.row_group"):
        cpp._rule_arguments(Rules(exclude_own_group=True), torch.float64, 3, 6)
    with pytest.raises(ValueError, match="rules.guide_cols"):
        cpp._rule_arguments(Rules(guide_rows=torch.ones(3, 2)), torch.float64, 3, 6)


# ---------------------------------------------------------------- shared tiles (rules.triangle, column_statistics)
#
# The joint directions' passes: a triangle (rows = the first R columns, only j > i or j >= R scored) and the
# first K columns' own softmaxes over the rows. Their statistics and gradients against the float64 reference
# pass are test_passes.py's grid; here what is the extension's own: layouts read in place, tile skipping,
# threads, errors.


def _shared_case(mode, similarity, extra, n_rows, seed):
    """(rows, cols, rules, positives): with the triangle the rows are cols[:, :R] (query_to_query, doc_to_doc);
    "groups" excludes each row's group (period R: query_to_query's self, doc_to_doc's documents), "penalty" is
    query_to_doc's hardness (column statistics only: the penalty is the rows')."""
    triangle, n_cols_of, k_of = SHARED_PASS_MODES[mode]
    n_cols = n_cols_of(n_rows)
    rows, cols = make_inputs(2, n_rows, n_cols, 48, seed=seed, requires_grad=False)
    if triangle:
        rows = cols[:, :n_rows].clone()
    if similarity == "dot":  # dot scores of magnitude ~ 10-100
        rows, cols = rows * 1.5, cols * 1.5
    groups = dict(group_period=n_rows, row_group=torch.arange(n_rows))
    fields = dict(similarity=similarity, triangle=triangle, column_statistics=k_of(n_rows, n_cols))
    if extra == "groups":
        fields.update(exclude_own_group=True, **groups)
    elif extra == "penalty":
        fields.update(penalty="hard_negatives", penalty_strength=2.0, **groups)
    elif extra == "penalty-batch":
        fields.update(penalty="in_batch_negatives", penalty_strength=0.5, **groups)
    if triangle and extra == "groups":
        positives = torch.full((n_rows,), -1)
    elif triangle:  # some positives above the diagonal, some at or below it (excluded: -inf)
        positives = torch.arange(n_rows).flip(0)
    else:
        positives = torch.arange(n_rows)
    return rows, cols, Rules(**fields), positives


SHARED_ACTIVE = ((True, False, True), (True, True, True))  # an inactive pair
SHARED_DIMS = (10, 30, 48)


def _lse(softmax):
    return softmax.offset + softmax.log_sum


@needs_extension
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_merged_joint_pass_on_a_prefix_view_matches_reference(similarity):
    """objective._merged_pass's layout: rows a prefix view X[:, :2B] of the columns X = [queries; docs] (not
    contiguous: read in place by the kernels), the queries' rows owning no column (group -1), the positives'
    rows excluding their own group, column statistics of the first 2B columns; B = 37 (one row block, odd)."""
    n_queries, n_groups = 37, 2
    generator = torch.Generator().manual_seed(11)
    both = torch.randn(2, n_queries * (1 + n_groups), SHARED_DIMS[-1], generator=generator, dtype=torch.float64)
    rows = both[:, :2 * n_queries]
    assert not rows.is_contiguous()
    anchors, absent = torch.arange(n_queries), torch.full((n_queries,), -1)
    rules = Rules(similarity=similarity, triangle=True, column_statistics=2 * n_queries, exclude_own_group=True,
                  group_period=n_queries, row_group=torch.cat([absent, anchors]))
    positives = torch.cat([anchors + n_queries, absent])
    check_pass("cpp", cpp, rows, both, SHARED_DIMS, SHARED_ACTIVE, 20.0 if similarity == "cos" else 1.0, positives,
               rules, torch.float64)


@needs_extension
@pytest.mark.parametrize("layout", ["expanded-layers", "prefix-of-longer", "transposed-features"])
def test_pass_rows_of_any_strides_match_reference(layout):
    """The pass reads rows in place only when their layout allows it (a prefix of a longer tensor's rows);
    layers expanded from one (stride 0) or strided features are copied first, not refused."""
    from m2d_kernels.backends import reference

    generator = torch.Generator().manual_seed(12)
    cols = torch.randn(2, 9, 16, generator=generator, dtype=torch.float64)
    rows = {"expanded-layers": torch.randn(1, 5, 16, generator=generator, dtype=torch.float64).expand(2, 5, 16),
            "prefix-of-longer": cols[:, :5],
            "transposed-features": torch.randn(2, 16, 5, generator=generator, dtype=torch.float64).transpose(1, 2)}[
        layout]
    positives, active, dims = torch.arange(5), ((True, True),) * 2, (8, 16)
    got = cpp.row_statistics(rows, cols, dims, active, 20.0, positives)
    want = reference.row_statistics(rows, cols, dims, active, 20.0, positives)
    torch.testing.assert_close(_lse(got.rows), _lse(want.rows), rtol=1e-12, atol=1e-12)
    coef = torch.rand(2, 2, generator=generator, dtype=torch.float64)
    have = cpp.pass_gradients(rows, cols, dims, active, 20.0, positives, want.rows, coef)
    expected = reference.pass_gradients(rows, cols, dims, active, 20.0, positives, want.rows, coef)
    for h, w in ((have.rows, expected.rows), (have.cols, expected.cols)):
        torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-12)


@needs_extension
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("mode", ["both-square", "both"])
def test_triangle_row_and_column_statistics_compose_to_the_full_pass(similarity, mode):
    """row_i (+) col_i of a triangle pass with K = R is row i's softmax over every column but its own group,
    and the triangle's gradients with those joint statistics sum to the full pass's: the composition identity
    of query_to_query (square) and doc_to_doc (wide: own group excluded on every column)."""
    rows, cols, rules, positives = _shared_case(mode, similarity, "groups", 130, seed=11)
    n_rows = rows.shape[1]
    full_rules = dataclasses.replace(rules, triangle=False, column_statistics=0)
    dims, active, scale = SHARED_DIMS, SHARED_ACTIVE, 20.0 if similarity == "cos" else 1.0
    tolerance = dict(atol=1e-9, rtol=1e-9)
    stats = cpp.row_statistics(rows, cols, dims, active, scale, positives, rules)
    joint = combine(stats.rows, stats.columns)
    full = cpp.row_statistics(rows, cols, dims, active, scale, positives, full_rules).rows
    on = torch.tensor(active)[:, None, :].expand_as(full.offset)  # inactive pairs' statistics mean nothing
    torch.testing.assert_close(_lse(joint)[on], _lse(full)[on], **tolerance)

    coef = torch.rand(2, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    got = cpp.pass_gradients(rows, cols, dims, active, scale, positives, joint, coef, rules, columns=joint)
    want = cpp.pass_gradients(rows, cols, dims, active, scale, positives, full, coef, full_rules)
    d_rows, d_cols, full_rows, full_cols = got.rows, got.cols.clone(), want.rows, want.cols.clone()
    # rows are cols[:, :R]: their gradient is the sum of both sides'.
    d_cols[:, :n_rows] += d_rows
    full_cols[:, :n_rows] += full_rows
    torch.testing.assert_close(d_cols, full_cols, **tolerance)


def _kept_tile_pairs(n_rows, n_cols):
    """(row block, column tile) pairs of a triangle holding some scored entry (j > i or j >= R), by brute force."""
    block, tile = cpp._extension()[0].tile_shape(n_cols)
    i = torch.arange(n_rows)[:, None]
    j = torch.arange(n_cols)[None, :]
    kept = (j > i) | (j >= n_rows)
    count = 0
    for r0 in range(0, n_rows, block):
        for c0 in range(0, n_cols, tile):
            count += bool(kept[r0:r0 + block, c0:c0 + tile].any())
    return count, -(-n_rows // block) * -(-n_cols // tile)


@needs_extension
@pytest.mark.parametrize(("n_rows", "n_cols"), [(1024, 1024), (700, 1500), (130, 130)])
def test_triangle_skips_tiles_wholly_below_the_diagonal(n_rows, n_cols):
    """The extension counts the (row block, column tile) pairs its tasks compute: a triangle computes exactly
    the pairs holding a scored entry (about half of a square's), a plain pass all of them."""
    kernels = cpp._extension()[0]
    cols = torch.randn(1, n_cols, 16, dtype=torch.float64)
    rows, positives = cols[:, :n_rows], torch.full((n_rows,), -1)
    dims, active, coef = (8, 16), ((True, True),), torch.ones(1, 2, dtype=torch.float64)
    kept, total = _kept_tile_pairs(n_rows, n_cols)
    for triangle, expected in ((True, kept), (False, total)):
        pass_rules = Rules(triangle=triangle)
        before = kernels.tile_pairs_computed()
        stats = cpp.row_statistics(rows, cols, dims, active, 20.0, positives, pass_rules)
        assert kernels.tile_pairs_computed() - before == expected, "forward"
        before = kernels.tile_pairs_computed()
        cpp.pass_gradients(rows, cols, dims, active, 20.0, positives, stats.rows, coef, pass_rules)
        assert kernels.tile_pairs_computed() - before == expected, "backward"
    if n_rows == n_cols == 1024:  # 128 x 256 tiles: the 8 crossing the diagonal are computed whole
        assert kept / total == 20 / 32


@needs_extension
def test_shared_tiles_independent_of_thread_count():
    rows, cols, rules, positives = _shared_case("both", "dot", "groups", 300, seed=13)
    dims, active = SHARED_DIMS, SHARED_ACTIVE
    coef = torch.rand(2, 3, generator=torch.Generator().manual_seed(14))
    rows, cols = rows.float(), cols.float()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            stats = cpp.row_statistics(rows, cols, dims, active, 1.0, positives, rules)
            grads = cpp.pass_gradients(rows, cols, dims, active, 1.0, positives, stats.rows, coef, rules,
                                       columns=stats.columns)
            results.append((stats.rows.offset, stats.rows.log_sum, stats.positive_logit, stats.columns.offset,
                            stats.columns.log_sum, grads.rows, grads.cols))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # bitwise


def test_shared_tiles_errors_name_the_argument():
    rows, cols = torch.randn(1, 3, 8), torch.randn(1, 6, 8)
    stats = Softmax(torch.zeros(1, 3, 1), torch.zeros(1, 3, 1))
    rules = Rules(column_statistics=3)
    with pytest.raises(ValueError, match="columns .* are required with rules.column_statistics"):
        cpp.pass_gradients(rows, cols, (8,), ((True,),), 1.0, torch.arange(3), stats, torch.ones(1, 1), rules)
    with pytest.raises(ValueError, match="columns.log_sum must have shape"):
        cpp.pass_gradients(rows, cols, (8,), ((True,),), 1.0, torch.arange(3), stats, torch.ones(1, 1), rules,
                           columns=Softmax(stats.offset, torch.zeros(1, 2, 1)))
    with pytest.raises(ValueError, match="rules.triangle"):
        cpp._rule_arguments(Rules(triangle=True), torch.float64, 7, 6)
    with pytest.raises(ValueError, match="rules.column_statistics"):
        cpp._rule_arguments(Rules(column_statistics=7), torch.float64, 3, 6)


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


_PASS_MEMORY_SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
from memory import peak_extra_bytes
from m2d_kernels.backends import cpp
from m2d_kernels.rules import Rules

def run(b, n, d=64):
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(1, b, d, generator=g), torch.randn(1, n, d, generator=g)
    rules = Rules(group_period=b, row_group=torch.arange(b), penalty="hard_negatives", penalty_strength=1.0,
                  guide_rows=F.normalize(torch.randn(b, d, generator=g), dim=-1),
                  guide_cols=F.normalize(torch.randn(n, d, generator=g), dim=-1),
                  guide_threshold=torch.full((b,), 0.1), teacher=True)
    positives, coef = torch.arange(b), torch.ones(1, 2)
    def step():
        stats = cpp.row_statistics(rows, cols, (32, d), ((True, True),), 20.0, positives, rules)
        cpp.pass_gradients(rows, cols, (32, d), ((True, True),), 20.0, positives, stats.rows, coef, rules, coef)
    return step, (rows.numel() + cols.numel()) * 4

run(128, 256)[0]()  # extension load, thread pools, BLAS buffers: not the call's memory
step, input_bytes = run(int(sys.argv[1]), 2 * int(sys.argv[1]))
print(json.dumps(dict(peak=peak_extra_bytes(step, torch.device("cpu")), input_bytes=input_bytes)))
"""


@needs_extension
def test_pass_with_every_rule_extra_memory_grows_at_most_linearly_with_the_batch():
    """Guide product and teacher tile per tile: nothing of size B x N (quadruples per doubling)."""
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(benchmarks), str(benchmarks.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    small, large = (
        json.loads(subprocess.run([sys.executable, "-c", _PASS_MEMORY_SCRIPT, str(b)], env=env,
                                                capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        for b in (1024, 4096)
    )
    assert small["peak"] is not None, "peak memory is measured on Linux only"
    growth = large["peak"] / small["peak"]
    assert growth <= 4 * 1.25, f"extra memory grew {growth:.1f}x for 4x the batch: {small} -> {large}"
    # The tiles are a fixed cost (threads x a few 128 x 512 tiles); a single B x N fp32 matrix at
    # B = 4096, N = 8192 would be 128 MiB.
    assert large["peak"] <= 0.1 * 4096 * 8192 * 4, large
