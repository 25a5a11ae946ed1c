"""Every bad input of the call (its arguments: docs/design.md, "1. The loss") gets a clear error naming the argument."""

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
        # Options that only mean something beside another: given alone they would be silently ignored.
        (dict(hardness_strength=9.0), ValueError, "hardness_strength=9.0 needs a hardness_mode"),
        (dict(guide_margin=0.1), ValueError, "guide_margin apply to a guide"),
        (dict(guide_margin=float("nan")), ValueError, "guide_margin must be a finite number"),
        (dict(guide_margin_strategy="relative"), ValueError, "guide_margin_strategy apply to a guide"),
        (dict(guide_exclude_self=False), ValueError, "guide_exclude_self apply to a guide"),
        (dict(guide_exclude_self="no"), TypeError, "guide_exclude_self must be a bool"),
        (dict(check_finite="yes"), TypeError, "check_finite must be a bool"),
        (dict(check_finite=1), TypeError, "check_finite must be a bool"),
        # Beyond the float32 accumulator the logits overflow (NaN); fp64 inputs have fp64's range.
        (dict(scale=3.5e38), ValueError, r"scale \+ hardness_strength must be at most 2.13e\+37 for torch.float32"),
        (dict(scale=1e37, hardness_mode="in_batch_negatives", hardness_strength=2e37, positive_index=None),
         ValueError, "scale \\+ hardness_strength must be at most"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


def test_check_finite_checks_the_guide():
    q, d = _inputs(N=8)
    guide = (torch.randn(4, 3), torch.full((8, 3), float("nan")))  # NaN cosines would drop nothing, silently
    with pytest.raises(ValueError, match=r"guide \(guide_docs\) contains NaN or Inf"):
        m2d.matryoshka_2d_infonce(q, d, (16,), guide=guide, check_finite=True)
    assert torch.isfinite(m2d.matryoshka_2d_infonce(q, d, (16,), guide=guide, backend="torch"))


def test_largest_scale_is_finite_on_every_cpu_backend():
    """The bound of the scale check: just below it, fp32 inputs still give a finite loss and gradients."""
    limit = torch.finfo(torch.float32).max / 16
    for backend in ("reference", "torch", "cpp"):
        for directions in (("query_to_doc",), ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")):
            q, d = (x.requires_grad_() for x in _inputs(N=8))
            loss = m2d.matryoshka_2d_infonce(q, d, (8, 16), scale=limit, directions=directions, backend=backend)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all(), backend


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
