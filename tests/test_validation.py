"""Every bad input of DESIGN.md section 2 gets a clear error naming the argument."""

import pytest
import torch

import m2d_kernels as m2d


def _inputs(L=2, B=4, N=6, D=16, dtype=torch.float32):
    return torch.randn(L, B, D, dtype=dtype), torch.randn(L, N, D, dtype=dtype)


def _call(queries=None, docs=None, dims=(8, 16), weights=None, **kwargs):
    q, d = _inputs()
    return m2d.matryoshka_2d_infonce(q if queries is None else queries, d if docs is None else docs, dims, weights,
                                     **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(queries=torch.randn(4, 16)), ValueError, r"queries must have shape \[L, rows, D\]"),
        (dict(docs=torch.randn(2, 6, 16, 1)), ValueError, r"docs must have shape \[L, rows, D\]"),
        (dict(queries=[[1.0]]), TypeError, "queries must be a torch.Tensor"),
        (dict(queries=torch.randn(2, 4, 16).long()), TypeError, "queries must be float16, bfloat16"),
        (dict(docs=torch.randn(2, 6, 16, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(docs=torch.randn(3, 6, 16)), ValueError, "same number of layers L"),
        (dict(docs=torch.randn(2, 6, 12)), ValueError, "same feature size D"),
        (dict(docs=torch.randn(2, 3, 16)), ValueError, r"docs must have at least as many rows N as queries B"),
        (dict(queries=torch.randn(2, 0, 16)), ValueError, "queries must be non-empty"),
        (dict(dims=(16, 8)), ValueError, "dims must be strictly increasing"),
        (dict(dims=(8, 8)), ValueError, "dims must be strictly increasing"),
        (dict(dims=(0, 8)), ValueError, "dims must be strictly increasing positive"),
        (dict(dims=(8, 32)), ValueError, "dims must not exceed the feature size D=16"),
        (dict(dims=()), TypeError, "dims must be a non-empty sequence of ints"),
        (dict(dims=(8.0, 16.0)), TypeError, "dims must be a non-empty sequence of ints"),
        (dict(dims=16), TypeError, "dims must be a sequence of ints"),
        (dict(weights=torch.ones(2, 3)), ValueError, r"weights must have shape \[L, M\] = \(2, 2\)"),
        (dict(weights=torch.ones(2)), ValueError, r"weights must have shape \[L, M\]"),
        (dict(weights=[[1.0, -1.0], [1.0, 1.0]]), ValueError, "weights must be finite and non-negative"),
        (dict(weights=[[1.0, float("nan")], [1.0, 1.0]]), ValueError, "weights must be finite and non-negative"),
        (dict(weights="ones"), TypeError, "weights must be a tensor or nested sequence"),
        (dict(scale=float("inf")), ValueError, "scale must be finite and positive"),
        (dict(scale=float("nan")), ValueError, "scale must be finite and positive"),
        (dict(scale=0.0), ValueError, "scale must be finite and positive"),
        (dict(scale="20"), TypeError, "scale must be a real number"),
        (dict(positive_index=torch.tensor([0, 1, 2, 6])), ValueError, r"positive_index values must be in \[0, N=6\)"),
        (dict(positive_index=torch.tensor([0, 1, 2, -1])), ValueError, "positive_index values must be in"),
        (dict(positive_index=torch.tensor([0, 1, 2])), ValueError, r"positive_index must have shape \[B\]"),
        (dict(positive_index=torch.tensor([0.0, 1, 2, 3])), TypeError, "positive_index must be a torch.long"),
        (dict(symmetric="yes"), TypeError, "symmetric must be a bool"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


def test_check_finite_raises_only_when_asked():
    q, d = _inputs()
    d[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="docs contains NaN or Inf"):
        m2d.matryoshka_2d_infonce(q, d, (16,), check_finite=True)
    assert not torch.isfinite(m2d.matryoshka_2d_infonce(q, d, (16,), backend="torch"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, d = _inputs()
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu"):
        m2d.matryoshka_2d_infonce(q, d, (16,), backend="triton")


def test_scale_accepts_numbers_and_zero_dim_tensors():
    q, d = _inputs()
    a = m2d.matryoshka_2d_infonce(q, d, (16,), scale=10, backend="torch")
    b = m2d.matryoshka_2d_infonce(q, d, (16,), scale=torch.tensor(10.0), backend="torch")
    c = m2d.matryoshka_2d_infonce(q, d, torch.tensor([16]), scale=10.0, backend="torch")
    assert a.item() == b.item() == c.item()
