"""Invariants of the loss (hypothesis): non-negativity, re-normalisation, batch permutation."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import m2d_kernels as m2d

BACKENDS = st.sampled_from(["reference", "torch"])


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 3))
    n_queries = draw(st.integers(1, 12))
    n_docs = n_queries + draw(st.integers(0, 12))
    n_features = draw(st.integers(2, 40))
    n_dims = draw(st.integers(1, min(4, n_features)))
    dims = sorted(draw(st.lists(st.integers(1, n_features), min_size=n_dims, max_size=n_dims, unique=True)))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(n_layers, n_queries, n_features, generator=generator, dtype=torch.float64)
    docs = torch.randn(n_layers, n_docs, n_features, generator=generator, dtype=torch.float64)
    return queries, docs, tuple(dims), draw(st.booleans()), draw(st.floats(0.5, 100.0))


@settings(max_examples=40, deadline=None)
@given(problem=problems(), backend=BACKENDS)
def test_loss_is_non_negative(problem, backend):
    queries, docs, dims, symmetric, scale = problem
    per_pair = m2d.matryoshka_2d_infonce(queries, docs, dims, scale=scale, symmetric=symmetric, reduction="none",
                                         backend=backend)
    # Cross-entropy is >= 0; allow rounding of a near-zero loss.
    assert (per_pair >= -1e-12).all()


@settings(max_examples=40, deadline=None)
@given(problem=problems(), backend=BACKENDS, factor=st.floats(0.01, 100.0))
def test_invariant_to_scaling_an_embedding(problem, backend, factor):
    queries, docs, dims, symmetric, scale = problem
    before = m2d.matryoshka_2d_infonce(queries, docs, dims, scale=scale, symmetric=symmetric, reduction="none",
                                       backend=backend)
    queries, docs = queries.clone(), docs.clone()
    queries[:, 0] *= factor
    docs[:, -1] *= factor
    after = m2d.matryoshka_2d_infonce(queries, docs, dims, scale=scale, symmetric=symmetric, reduction="none",
                                      backend=backend)
    torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(problem=problems(), backend=BACKENDS, seed=st.integers(0, 1000))
def test_equivariant_to_batch_permutation(problem, backend, seed):
    queries, docs, dims, symmetric, scale = problem
    n_queries, n_docs = queries.shape[1], docs.shape[1]
    before = m2d.matryoshka_2d_infonce(queries, docs, dims, scale=scale, symmetric=symmetric, reduction="none",
                                       backend=backend)
    generator = torch.Generator().manual_seed(seed)
    query_order = torch.randperm(n_queries, generator=generator)
    doc_order = torch.randperm(n_docs, generator=generator)
    # Move query i to position of query_order, its positive docs[i] wherever doc_order puts it.
    new_position = torch.empty_like(doc_order)
    new_position[doc_order] = torch.arange(n_docs)
    positive_index = new_position[query_order]
    after = m2d.matryoshka_2d_infonce(queries[:, query_order], docs[:, doc_order], dims, scale=scale,
                                      positive_index=positive_index, symmetric=symmetric, reduction="none",
                                      backend=backend)
    torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)
