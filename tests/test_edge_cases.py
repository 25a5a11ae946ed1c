"""Unusual inputs no backend may get silently wrong (issue 20): strided and expanded indices,
non-contiguous embeddings, second derivatives, a learnable temperature, learned pair weights,
and scales far beyond the usual 20-100.

Truth is the float64 `reference` backend (naive, sentence-transformers' semantics) or, for the
scale gradient, plain autograd through a per-pair loss written here with the scale as a tensor.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, loss_and_grads, make_inputs, oracle_pair_losses

import m2d_kernels as m2d
from m2d_kernels.backends import unavailable_reason

BACKENDS = ["reference", "torch", "cpp", "triton"]
# The triton backend takes no fp64; under the CPU interpreter it runs fp32 (slowly: small shapes).
FLOAT64_BACKENDS = ["reference", "torch", "cpp"]
DIMS = (8, 20, 32)


def _skip_unavailable(backend):
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _dtype(backend):
    return torch.float64 if backend in FLOAT64_BACKENDS else torch.float32


def _close(actual, expected, dtype, name):
    assert_close(actual, expected, torch.float64 if dtype == torch.float64 else torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_kind", ["expanded", "stacked_column", "reversed_view"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_any_stride_of_positive_index(backend, index_kind, symmetric):
    _skip_unavailable(backend)
    dtype = _dtype(backend)
    queries, docs = make_inputs(2, 5, 12, 32, seed=1)
    if index_kind == "expanded":  # stride 0: every query shares one positive
        positive_index = torch.tensor([3]).expand(5)
    elif index_kind == "stacked_column":  # stride 2
        positive_index = torch.stack([torch.tensor([7, 2, 9, 0, 11]), torch.arange(5)], dim=1)[:, 0]
    else:  # every other entry of a longer index
        positive_index = torch.tensor([11, 0, 4, 1, 9, 2, 6, 3, 10, 4])[::2]
    assert not positive_index.is_contiguous()
    kwargs = dict(positive_index=positive_index, symmetric=symmetric)
    expected = loss_and_grads(queries, docs, DIMS, None, "reference", **kwargs)
    got = loss_and_grads(queries.to(dtype), docs.to(dtype), DIMS, None, backend, **kwargs)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected):
        _close(g, e, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_embeddings(backend):
    _skip_unavailable(backend)
    dtype = _dtype(backend)
    queries, docs = make_inputs(2, 5, 10, 32, seed=2, requires_grad=False)
    # Feature-major storage and a layer-strided view: neither is contiguous.
    q_strided = queries.to(dtype).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    d_strided = torch.stack([docs, torch.zeros_like(docs)], dim=1).to(dtype)[:, 0].detach().requires_grad_()
    assert not q_strided.is_contiguous() and not d_strided.is_contiguous()
    loss = m2d.matryoshka_2d_infonce(q_strided, d_strided, DIMS, backend=backend, symmetric=True)
    loss.backward()
    expected = loss_and_grads(queries, docs, DIMS, None, "reference", symmetric=True)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), (loss, q_strided.grad, d_strided.grad), expected):
        _close(g, e, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_is_right_or_refused(backend):
    """Double backward (gradient penalties, meta-learning): either the exact second-order result
    or an error at the second backward, never a silent first-order one."""
    _skip_unavailable(backend)
    dtype = _dtype(backend)
    queries, docs = make_inputs(1, 4, 8, 32, seed=3, requires_grad=False)

    def gradient_penalty(name):
        q = queries.to(dtype).clone().requires_grad_()
        d = docs.to(dtype).clone().requires_grad_()
        loss = m2d.matryoshka_2d_infonce(q, d, DIMS, backend=name, scale=5.0)
        (grad_q,) = torch.autograd.grad(loss, q, create_graph=True)
        (grad_q.square().sum() * 100).backward()
        return q.grad, d.grad

    expected = gradient_penalty("reference")
    assert expected[0].abs().max() > 1e-3  # the truth is not trivially zero
    try:
        got = gradient_penalty(backend)
    except RuntimeError as error:
        assert backend != "reference", error
        # Refused, as allowed, but with an error that says what happened.
        assert re.search(r"twice|second.order|double backward", str(error)), (
            f"unclear error: {error} (torch_prefix.first_order_only gives the backends' gradients a graph that says so)"
        )
        return
    for name, g, e in zip(("second-order grad_queries", "second-order grad_docs"), got, expected):
        assert g is not None, f"{name}: no gradient"
        _close(g, e.to(dtype), dtype, name)


def _naive_losses_with_tensor_scale(queries, docs, dims, scale, positive_index, symmetric):
    """Per-pair losses [L, M] with `scale` a tensor, so autograd gives d/d scale (independent of the library)."""
    out = []
    labels = torch.arange(queries.shape[1])
    for layer in range(queries.shape[0]):
        for d in dims:
            q = F.normalize(queries[layer, :, :d], dim=-1)
            k = F.normalize(docs[layer, :, :d], dim=-1)
            loss = F.cross_entropy(scale * q @ k.T, positive_index)
            if symmetric:
                loss = (loss + F.cross_entropy(scale * k[positive_index] @ q.T, labels)) / 2
            out.append(loss)
    return torch.stack(out).view(queries.shape[0], len(dims))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_value", [1.0, 20.0, 100.0])
def test_learnable_scale_gets_its_gradient(backend, symmetric, scale_value):
    _skip_unavailable(backend)
    dtype = _dtype(backend)
    queries, docs = make_inputs(2, 5, 12, 32, seed=4, requires_grad=False)
    positive_index = torch.tensor([6, 1, 2, 9, 4])
    weights = torch.tensor([[1.0, 0.0, 0.5], [2.0, 1.0, 0.0]], dtype=torch.float64)

    log_scale = torch.tensor(math.log(scale_value), dtype=torch.float64, requires_grad=True)
    truth = (weights * _naive_losses_with_tensor_scale(queries, docs, DIMS, log_scale.exp(), positive_index,
                                                       symmetric)).sum()
    truth.backward()

    learned = torch.tensor(math.log(scale_value), dtype=dtype, requires_grad=True)  # CLIP-style log scale
    q = queries.to(dtype).requires_grad_()
    loss = m2d.matryoshka_2d_infonce(q, docs.to(dtype), DIMS, weights, scale=learned.exp(),
                                     positive_index=positive_index, symmetric=symmetric, backend=backend)
    loss.backward()
    assert learned.grad is not None, "the learnable scale got no gradient"
    _close(loss, truth.detach(), dtype, "loss")
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    assert math.isclose(learned.grad.item(), log_scale.grad.item(), rel_tol=tolerance, abs_tol=tolerance), (
        f"d loss / d log_scale: got {learned.grad.item()}, expected {log_scale.grad.item()}"
    )
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_learnable_scale_trains():
    # One SGD step on log_scale lowers the loss (the gradient has the right sign and size).
    queries, docs = make_inputs(1, 8, 16, 32, seed=5, requires_grad=False)
    log_scale = torch.tensor(math.log(5.0), requires_grad=True, dtype=torch.float64)
    before = m2d.matryoshka_2d_infonce(queries, docs, (32,), scale=log_scale.exp(), backend="torch")
    before.backward()
    with torch.no_grad():
        log_scale -= 0.1 * log_scale.grad
    after = m2d.matryoshka_2d_infonce(queries, docs, (32,), scale=log_scale.exp(), backend="torch")
    assert after < before


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_weights_get_the_pair_losses_as_gradient(backend):
    _skip_unavailable(backend)
    dtype = _dtype(backend)
    queries, docs = make_inputs(2, 5, 10, 32, seed=6)
    weights = torch.tensor([[0.5, 0.0, 1.0], [1.5, 2.0, 0.0]], dtype=dtype, requires_grad=True)
    q, d = queries.detach().to(dtype).requires_grad_(), docs.detach().to(dtype).requires_grad_()
    loss = m2d.matryoshka_2d_infonce(q, d, DIMS, weights, backend=backend, symmetric=True)
    loss.backward()
    # d total / d w[l, m] = loss_lm, including where w = 0 (the pair must still be computed).
    pair_losses = torch.from_numpy(oracle_pair_losses(queries, docs, DIMS, symmetric=True))
    _close(weights.grad, pair_losses, dtype, "d loss / d weights")
    expected = loss_and_grads(queries, docs, DIMS, weights.detach().double(), "reference", symmetric=True)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), (loss, q.grad, d.grad), expected):
        _close(g, e, dtype, name)


def _scale_inputs(dtype, seed):
    # Weakly correlated positives: at huge scales many rows put their softmax mass on a negative,
    # so the gradients are not all zero.
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(2, 6, 32, generator=generator, dtype=torch.float64)
    docs = torch.randn(2, 18, 32, generator=generator, dtype=torch.float64)
    docs[:, :6] += 0.3 * queries
    return queries.to(dtype).double(), docs.to(dtype).double()  # rounded to dtype: no input rounding error


def _relative_errors(got, expected):
    loss_error = abs(got[0].item() - expected[0].item()) / max(abs(expected[0].item()), 1e-30)
    grad_errors = [(g.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
                   for g, e in zip(got[1:], expected[1:])]
    return [loss_error, *grad_errors]


# (dtype, scale): up to the edges the README claims (1e8 for fp32 inputs, 1e16 for fp64).
LARGE_SCALES = [(torch.float32, s) for s in (1e4, 1e6, 1e8)] + [(torch.float64, s) for s in (1e4, 1e8, 1e12, 1e16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, scale", LARGE_SCALES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("symmetric", [False, True])
def test_large_scales_stay_accurate(backend, dtype, scale, symmetric):
    """No backend may be less accurate than the bound below at scales up to the claimed edge.

    The bound: relative error of the loss and of each gradient (max-abs error over max-abs value)
    within 1e-9 (fp64) or 1e-4 (fp32) of the float64 reference on the same inputs.
    """
    _skip_unavailable(backend)
    if dtype == torch.float64 and backend not in FLOAT64_BACKENDS:
        pytest.skip(f"{backend} takes no float64")
    queries, docs = _scale_inputs(dtype, seed=int(math.log10(scale)))
    kwargs = dict(scale=scale, symmetric=symmetric)
    expected = loss_and_grads(queries, docs, DIMS, None, "reference", **kwargs)
    assert expected[1].abs().max() > 0  # some softmax mass on negatives: a real test of the gradient
    got = loss_and_grads(queries.to(dtype), docs.to(dtype), DIMS, None, backend, **kwargs)
    bound = 1e-9 if dtype == torch.float64 else 1e-4
    for name, error in zip(("loss", "grad_queries", "grad_docs"), _relative_errors(got, expected)):
        assert error <= bound, f"{name}: relative error {error:.3g} > {bound:g} at scale {scale:g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e10), (torch.float64, 1e20)], ids=["fp32-1e10", "fp64-1e20"])
def test_beyond_the_claimed_scales_results_stay_finite(backend, dtype, scale):
    _skip_unavailable(backend)
    if dtype == torch.float64 and backend not in FLOAT64_BACKENDS:
        pytest.skip(f"{backend} takes no float64")
    queries, docs = _scale_inputs(dtype, seed=0)
    loss, grad_q, grad_d = loss_and_grads(queries.to(dtype), docs.to(dtype), DIMS, None, backend, scale=scale,
                                          symmetric=True)
    assert torch.isfinite(loss) and torch.isfinite(grad_q).all() and torch.isfinite(grad_d).all()


# --- Found by differential fuzzing against the float64 reference (issue 28) ---------------------------------


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_float64_column_statistics_at_a_scale_not_exact_in_float32(backend):
    """doc_to_query's rows from query_to_doc's column statistics: their fixed offset (scale 20.1, not a float32
    number) must stay float64; a float32 offset put the loss off by 2e-8 and the gradients by 2e-7."""
    queries, docs = make_inputs(1, 4, 8, 8, seed=5)
    kwargs = dict(scale=20.1, directions=("query_to_doc", "doc_to_query"))
    expected = loss_and_grads(queries, docs, (8,), None, "reference", **kwargs)
    got = loss_and_grads(queries, docs, (8,), None, backend, **kwargs)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("shape", ["cls_batch_of_one", "one_feature"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_size_one_dimensions_with_any_stride(backend, shape, n_layers):
    """PyTorch calls a tensor contiguous whatever the stride of a size-1 dimension: CLS pooling of a batch of
    one (``hidden[:, :, 0]``, B = 1) or one feature taken from a wider tensor (D = 1)."""
    generator = torch.Generator().manual_seed(6)
    if shape == "cls_batch_of_one":
        queries = torch.randn(n_layers, 1, 7, 16, generator=generator, dtype=torch.float64)[:, :, 0]  # (112, 112, 1)
        docs = torch.randn(n_layers, 3, 16, generator=generator, dtype=torch.float64)
        dims = (8, 16)
    else:
        queries = torch.randn(n_layers, 4, 5, generator=generator, dtype=torch.float64)[:, :, 2:3]  # strides (20, 5, 1)
        docs = torch.randn(n_layers, 6, 5, generator=generator, dtype=torch.float64)[:, :, 3:4].contiguous()
        docs = docs.as_strided(docs.shape, (6, 1, 99))  # D = 1: a stride PyTorch ignores
        dims = (1,)
    assert docs.is_contiguous() and (queries.is_contiguous() or n_layers > 1 or shape == "one_feature")
    for directions in (("query_to_doc",), ("query_to_doc", "query_to_query", "doc_to_query")):
        expected = loss_and_grads(queries, docs, dims, None, "reference", directions=directions)
        got = loss_and_grads(queries, docs, dims, None, backend, directions=directions)
        for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("directions", [("query_to_doc", "query_to_query"), ("query_to_doc", "query_to_query",
                                                                            "doc_to_query", "doc_to_doc")])
def test_one_query_with_query_to_query(backend, directions):
    """B = 1: query_to_query has no other query (the merged pass's triangle keeps no column of the square)."""
    queries, docs = make_inputs(2, 1, 3, 8, seed=7)
    expected = loss_and_grads(queries, docs, (4, 8), None, "reference", directions=directions)
    got = loss_and_grads(queries, docs, (4, 8), None, backend, directions=directions)
    for name, g, e in zip(("loss", "grad_queries", "grad_docs"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_distillation_with_one_direction_in_either_partition(backend):
    """One direction: ``partition_mode="per_direction"`` is the same softmax as "joint" (it raised
    UnboundLocalError). Truth: cross-entropy and ``F.kl_div`` against the detached teacher, written here."""
    queries, docs = make_inputs(2, 4, 8, 8, seed=8)
    dims, scale, distill = (4, 8), 20.0, [[0.5, 0.0], [1.0, 2.0]]

    def logits(layer, dim):
        return scale * F.normalize(queries[layer, :, :dim], dim=-1) @ F.normalize(docs[layer, :, :dim], dim=-1).T

    labels = torch.arange(4)
    teacher = F.softmax(logits(1, 8), dim=1)
    expected_losses = torch.stack([torch.stack([F.cross_entropy(logits(layer, dim), labels) for dim in dims])
                                   for layer in range(2)])
    expected_distill = torch.stack([torch.stack([
        F.kl_div(F.log_softmax(logits(layer, dim), dim=1), teacher, reduction="batchmean") * (w > 0)
        for dim, w in zip(dims, distill[layer])]) for layer in range(2)])
    losses, terms = m2d.matryoshka_2d_infonce(queries, docs, dims, scale=scale, partition_mode="per_direction",
                                              distill_weights=distill, reduction="none", backend=backend)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms, expected_distill, rtol=1e-10, atol=1e-12)
