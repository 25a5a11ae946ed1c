"""`reference` and `torch` backends against an independent float64 oracle and each other's autograd."""

import math

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

BACKENDS = ["reference", "torch"]

# (L, B, N, D, dims): odd on purpose. B=1, N=3B hard negatives, dims not multiples of 16.
SHAPES = [
    (1, 1, 1, 48, (48,)),
    (2, 3, 9, 48, (8, 24, 48)),
    (3, 37, 111, 100, (24, 40, 100)),
    (2, 130, 130, 100, (17, 50, 99)),
    (1, 16, 40, 384, (32, 64, 128, 256, 384)),
]


def _random_weights(n_layers, n_dims, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(n_layers, n_dims, generator=generator, dtype=torch.float64) + 0.1
    weights[torch.rand(n_layers, n_dims, generator=generator) < 0.3] = 0.0
    weights[0, -1] = 1.0  # keep at least one active pair
    return weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-B{}-N{}-D{}".format(*s[:4]))
@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_matches_oracle_float64(backend, shape, symmetric):
    n_layers, n_queries, n_docs, n_features, dims = shape
    queries, docs = make_inputs(n_layers, n_queries, n_docs, n_features)
    weights = _random_weights(n_layers, len(dims), seed=n_queries)
    per_pair = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, symmetric=symmetric, reduction="none",
                                         backend=backend)
    expected = torch.from_numpy(oracle_pair_losses(queries, docs, dims, weights, symmetric=symmetric))
    assert per_pair.shape == (n_layers, len(dims))
    assert_close(per_pair, expected, torch.float64, "per-pair losses")
    total = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, symmetric=symmetric, backend=backend)
    assert_close(total, (weights * expected).sum(), torch.float64, "weighted sum")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-B{}-N{}-D{}".format(*s[:4]))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale", [1.0, 20.0, 100.0])
def test_torch_gradients_match_reference_float64(shape, symmetric, scale):
    n_layers, n_queries, n_docs, n_features, dims = shape
    queries, docs = make_inputs(n_layers, n_queries, n_docs, n_features)
    weights = _random_weights(n_layers, len(dims), seed=n_docs)
    expected = loss_and_grads(queries, docs, dims, weights, "reference", scale=scale, symmetric=symmetric)
    got = loss_and_grads(queries, docs, dims, weights, "torch", scale=scale, symmetric=symmetric)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected):
        assert_close(g, e, torch.float64, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_positive_index_with_hard_negatives(backend, symmetric):
    queries, docs = make_inputs(2, 11, 33, 40)
    generator = torch.Generator().manual_seed(3)
    positive_index = torch.randperm(33, generator=generator)[:11]
    positive_index[3] = positive_index[4]  # two queries sharing a positive is allowed
    dims = (10, 25, 40)
    per_pair = m2d.matryoshka_2d_infonce(queries, docs, dims, positive_index=positive_index, symmetric=symmetric,
                                         reduction="none", backend=backend)
    expected = oracle_pair_losses(queries, docs, dims, positive_index=positive_index, symmetric=symmetric)
    assert_close(per_pair, torch.from_numpy(expected), torch.float64)
    if backend == "torch":
        kwargs = dict(positive_index=positive_index, symmetric=symmetric)
        for g, e in zip(loss_and_grads(queries, docs, dims, None, "torch", **kwargs),
                        loss_and_grads(queries, docs, dims, None, "reference", **kwargs)):
            assert_close(g, e, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_pairs_are_skipped_and_get_no_gradient(backend):
    queries, docs = make_inputs(2, 5, 10, 32)
    dims = (8, 16, 32)
    weights = torch.zeros(2, 3, dtype=torch.float64)
    weights[1, 0] = 2.0  # only layer 1, dim 8
    per_pair = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, reduction="none", backend=backend)
    assert per_pair[1, 0] > 0
    per_pair[1, 0] = 0
    assert torch.count_nonzero(per_pair) == 0
    _, grad_q, grad_d = loss_and_grads(queries, docs, dims, weights, backend)
    assert torch.count_nonzero(grad_q[0]) == 0 and torch.count_nonzero(grad_d[0]) == 0
    assert torch.count_nonzero(grad_q[1, :, 8:]) == 0 and torch.count_nonzero(grad_d[1, :, 8:]) == 0
    assert torch.count_nonzero(grad_q[1, :, :8]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [20.0, 39.0, 50.0, 100.0])  # both sides of the fixed-max bound
def test_large_scale_stays_finite_and_exact(backend, scale):
    # Strongly anti-correlated candidates: exp(scale * (cos - 1)) underflows in fp32 without a running max.
    queries, docs = make_inputs(1, 6, 12, 16, dtype=torch.float32)
    with torch.no_grad():
        docs[:, 6:] = -queries.repeat(1, 1, 1)
    loss, grad_q, grad_d = loss_and_grads(queries, docs, (8, 16), None, backend, scale=scale, symmetric=True)
    assert torch.isfinite(loss) and torch.isfinite(grad_q).all() and torch.isfinite(grad_d).all()
    expected = oracle_pair_losses(queries, docs, (8, 16), scale=scale, symmetric=True).sum()
    assert math.isclose(loss.item(), expected, rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inputs(backend):
    queries, docs = make_inputs(2, 24, 48, 64, seed=7)
    dims = (16, 40, 64)
    expected = loss_and_grads(queries, docs, dims, None, "reference", symmetric=True)
    got = loss_and_grads(queries.float(), docs.float(), dims, None, backend, symmetric=True)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert_close(g, e, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_low_precision_within_twice_reference_error(dtype):
    queries, docs = make_inputs(2, 24, 48, 64, seed=7)
    assert_within_twice_reference_error("torch", queries, docs, (16, 40, 64), dtype, symmetric=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_backend_gradcheck(symmetric):
    queries, docs = make_inputs(2, 3, 7, 10, seed=11)
    weights = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]], dtype=torch.float64)
    positive_index = torch.tensor([4, 0, 2])

    def loss(q, d):
        return m2d.matryoshka_2d_infonce(q, d, (3, 6, 10), weights, scale=5.0, positive_index=positive_index,
                                         symmetric=symmetric, backend="torch")

    assert torch.autograd.gradcheck(loss, (queries, docs))


def test_reduction_none_gradient_uses_incoming_weights():
    # The [L, M] output is differentiable: weighting it by hand equals passing weights.
    queries, docs = make_inputs(2, 9, 18, 30)
    dims = (10, 30)
    weights = torch.tensor([[0.5, 2.0], [1.5, 0.25]], dtype=torch.float64)
    expected = loss_and_grads(queries, docs, dims, weights, "reference")
    q, d = queries.detach().clone().requires_grad_(), docs.detach().clone().requires_grad_()
    per_pair = m2d.matryoshka_2d_infonce(q, d, dims, reduction="none", backend="torch")
    (per_pair * weights).sum().backward()
    for g, e in zip((q.grad, d.grad), expected[1:]):
        assert_close(g, e, torch.float64)


def test_zero_embedding_rows_follow_f_normalize():
    # Norms below eps are clamped by F.normalize, which then passes no gradient through the norm.
    queries, docs = make_inputs(1, 4, 8, 12)
    with torch.no_grad():
        queries[0, 1] = 0.0
        queries[0, 2, :4] = 1e-14  # tiny prefix: clamped for dim 4, not for dim 12
        docs[0, 5, :4] = 1e-14
    dims = (4, 12)
    expected = loss_and_grads(queries, docs, dims, None, "reference", symmetric=True)
    got = loss_and_grads(queries, docs, dims, None, "torch", symmetric=True)
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        assert_close(g, e, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    queries, docs = make_inputs(1, 4, 4, 8, requires_grad=False)
    queries[0, 2, 3] = float("nan")
    assert torch.isnan(m2d.matryoshka_2d_infonce(queries, docs, (8,), backend=backend))


def test_chunked_rows_match_single_chunk(monkeypatch):
    # Force many small row chunks: the result must not depend on the chunking.
    from m2d_kernels.backends import torch_prefix

    queries, docs = make_inputs(2, 29, 58, 24)
    expected = loss_and_grads(queries, docs, (8, 24), None, "reference", symmetric=True)
    monkeypatch.setattr(torch_prefix, "CHUNK_ELEMENTS", 58 * 6 * 4)  # 4 rows per chunk
    got = loss_and_grads(queries, docs, (8, 24), None, "torch", symmetric=True)
    for g, e in zip(got, expected):
        assert_close(g, e, torch.float64)


def test_loss_module_matches_functional_and_accepts_callable_weights():
    queries, docs = make_inputs(2, 6, 12, 16)
    weights = torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    module = m2d.Matryoshka2dInfoNCELoss((8, 16), weights=lambda: weights, scale=10.0, symmetric=True,
                                         backend="torch")
    expected = (weights * torch.from_numpy(oracle_pair_losses(queries, docs, (8, 16), weights, scale=10.0,
                                                               symmetric=True))).sum()
    assert_close(module(queries, docs), expected, torch.float64)
    assert module(queries, docs, reduction="none").shape == (2, 2)
    assert "symmetric=True" in repr(module)


@pytest.mark.parametrize(("dims", "error", "match"), [((64, 32), ValueError, "dims must be strictly increasing"),
                                                      ((), TypeError, "dims must be a non-empty sequence"),
                                                      (16, TypeError, "dims must be a sequence of ints")])
def test_loss_module_checks_its_dims_when_built(dims, error, match):
    """A wrong dims is named at construction, not at the first call (possibly minutes into training)."""
    with pytest.raises(error, match=match):
        m2d.Matryoshka2dInfoNCELoss(dims)


def test_auto_backend_and_available_backends():
    names = m2d.available_backends()
    assert "torch" in names and "reference" in names
    queries, docs = make_inputs(1, 4, 4, 8)
    expected = oracle_pair_losses(queries, docs, (4, 8)).sum()
    assert math.isclose(m2d.matryoshka_2d_infonce(queries, docs, (4, 8)).item(), expected, rel_tol=1e-9)


def test_reference_matches_sentence_transformers_mnrl():
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    queries, docs = make_inputs(1, 8, 24, 20, dtype=torch.float32, requires_grad=False)
    negatives = [docs[0, 8:16], docs[0, 16:24]]

    class _NoModel(torch.nn.Module):
        pass

    for symmetric in (False, True):
        directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
        mnrl = st_losses.MultipleNegativesRankingLoss(_NoModel(), scale=20.0, directions=directions,
                                                      partition_mode="per_direction")
        expected = mnrl.compute_loss_from_embeddings([queries[0, :, :12], docs[0, :8, :12]]
                                                     + [n[:, :12] for n in negatives], None)
        got = m2d.matryoshka_2d_infonce(queries, docs, (12,), symmetric=symmetric, backend="reference")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
def test_torch_backend_under_torch_compile(compile_backend):
    queries, docs = make_inputs(2, 8, 16, 16, seed=5)

    def loss(q, d):
        return m2d.matryoshka_2d_infonce(q, d, (8, 16), backend="torch", symmetric=True)

    fn = loss if compile_backend is None else torch.compile(loss, backend=compile_backend, fullgraph=True)
    q, d = queries.detach().clone().requires_grad_(), docs.detach().clone().requires_grad_()
    value = fn(q, d)
    value.backward()
    expected = loss_and_grads(queries, docs, (8, 16), None, "reference", symmetric=True)
    for g, e in zip((value, q.grad, d.grad), expected):
        assert_close(g, e, torch.float64)
