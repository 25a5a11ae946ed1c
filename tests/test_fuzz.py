"""The public function over random option combinations, every backend against the float64 oracle.

Every call must either match the float64 ``reference`` (sentence-transformers' semantics, one materialised
block per direction and pair) within the documented bound, or raise a ``ValueError`` / ``TypeError`` naming
one of its arguments: never another exception, never a silent deviation. Drawn: shapes with B = 1, D = 1 and
N = B among them; every direction set and partition; hardness; cos / dot; a guide (with ties); distillation;
pair weights with zeros; fp64 / fp32 / bf16; non-contiguous embeddings and a given ``positive_index``.

CI runs a fixed set of examples (``derandomize``); ``M2D_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` runs
more.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import m2d_kernels as m2d
from m2d_kernels.backends import unavailable_reason

EXAMPLES = int(os.environ.get("M2D_FUZZ_EXAMPLES", "300"))
ARGUMENTS = tuple(inspect.signature(m2d.matryoshka_2d_infonce).parameters)
DIRECTION_SETS = [("query_to_doc",) + extra for extra in (
    (), ("query_to_query",), ("doc_to_query",), ("doc_to_doc",), ("query_to_query", "doc_to_query"),
    ("query_to_query", "doc_to_doc"), ("doc_to_query", "doc_to_doc"), ("query_to_query", "doc_to_query", "doc_to_doc"))]
# The documented bounds (README, *Accuracy*): max-abs error over the largest entry of the truth.
BOUND = {torch.float64: 1e-9, torch.float32: 1e-4}


@st.composite
def calls(draw):
    """(backend, dtype, layout of the embeddings, options of matryoshka_2d_infonce, seed)."""
    backend = draw(st.sampled_from(["torch", "cpp", "triton"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16] if backend == "triton"
                                 else [torch.float64, torch.float64, torch.float32, torch.bfloat16]))
    n_layers, n_queries = draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2, 3, 5]))
    n_features = draw(st.sampled_from([1, 2, 7, 16, 24]))
    grouped = draw(st.booleans())  # sentence-transformers' layout: N = k B, the positives first
    n_docs = n_queries * draw(st.integers(1, 3)) if grouped else n_queries + draw(st.sampled_from([0, 0, 1, 4]))
    n_dims = draw(st.integers(1, min(3, n_features)))
    dims = tuple(sorted(draw(st.lists(st.integers(1, n_features), min_size=n_dims, max_size=n_dims, unique=True))))
    similarity = draw(st.sampled_from(["cos", "dot"]))
    guided = draw(st.integers(0, 2)) == 0
    directions = draw(st.sampled_from(DIRECTION_SETS))
    if guided and "doc_to_query" in directions and draw(st.integers(0, 3)):  # mostly a valid guided call
        directions = tuple(d for d in directions if d != "doc_to_query")
    options = dict(
        directions=directions,
        partition_mode=draw(st.sampled_from(["joint"] * 5 + ["per_direction"])),
        similarity=similarity,
        scale=draw(st.sampled_from([0.5, 7.0, 20.1, 1 / 0.07] if similarity == "cos" else [0.05, 0.3, 1.0])),
    )
    if draw(st.booleans()):
        options["weights"] = draw(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=n_dims,
                                                    max_size=n_dims), min_size=n_layers, max_size=n_layers))
    if draw(st.integers(0, 3)) == 0:
        options["hardness_mode"] = draw(st.sampled_from([None, "in_batch_negatives", "hard_negatives",
                                                         "all_negatives"]))
        options["hardness_strength"] = draw(st.sampled_from([0.0, 0.5, 9.0]))
    if guided:
        options.update(guide_margin=draw(st.sampled_from([0.0, 0.0, 0.1, -0.05])),
                       guide_margin_strategy=draw(st.sampled_from(["absolute", "relative"])),
                       guide_exclude_self=draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        options["distill_weights"] = draw(st.lists(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=n_dims,
                                                            max_size=n_dims), min_size=n_layers, max_size=n_layers))
    layout = dict(n_layers=n_layers, n_queries=n_queries, n_docs=n_docs, n_features=n_features, dims=dims,
                  guided=guided, positive_index=draw(st.sampled_from([None, None, "shuffled"])),
                  strides=draw(st.sampled_from(["contiguous", "transposed", "sliced"])))
    return backend, dtype, layout, options, draw(st.integers(0, 2**31 - 1))


def _embeddings(layout, seed):
    """float64 queries / docs with the drawn strides, a guide with duplicate rows (ties), a positive_index."""
    generator = torch.Generator().manual_seed(seed)
    n_layers, n_queries, n_docs, n_features = (layout[k] for k in ("n_layers", "n_queries", "n_docs", "n_features"))

    def tensor(rows):
        if layout["strides"] == "transposed":  # rows strided, features contiguous... the other way round
            return torch.randn(n_layers, n_features, rows, generator=generator, dtype=torch.float64).transpose(1, 2)
        if layout["strides"] == "sliced":  # every other row of a wider tensor, a leading feature slice
            wide = torch.randn(n_layers, 2 * rows, n_features + 3, generator=generator, dtype=torch.float64)
            return wide[:, ::2, 1:n_features + 1]
        return torch.randn(n_layers, rows, n_features, generator=generator, dtype=torch.float64)

    queries, docs = tensor(n_queries), tensor(n_docs)
    guide = None
    if layout["guided"]:
        guide_queries = torch.randn(n_queries, 5, generator=generator, dtype=torch.float64)
        guide_docs = torch.randn(n_docs, 5, generator=generator, dtype=torch.float64)
        guide_docs[:n_queries] += guide_queries  # positives close to their queries
        guide_docs[-1] = 2 * guide_docs[0]  # a duplicate of the first positive: a tie, kept
        guide = (guide_queries, guide_docs)
    positive_index = None
    if layout["positive_index"] == "shuffled":
        positive_index = torch.randperm(n_docs, generator=generator)[:n_queries]
    return queries, docs, guide, positive_index


def _call(queries, docs, dims, options, backend, guide, positive_index):
    """(losses, distill or None, grad_queries, grad_docs) of one call, differentiated through fixed weights."""
    queries, docs = queries.detach().requires_grad_(), docs.detach().requires_grad_()
    out = m2d.matryoshka_2d_infonce(queries, docs, dims, **options, guide=guide, positive_index=positive_index,
                                    reduction="none", backend=backend)
    losses, distill = out if isinstance(out, tuple) else (out, None)
    generator = torch.Generator().manual_seed(1)
    total = (losses.double() * torch.rand(losses.shape, generator=generator, dtype=torch.float64)).sum()
    if distill is not None:
        total = total + (distill.double() * torch.rand(distill.shape, generator=generator, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(total, (queries, docs), allow_unused=True, materialize_grads=True)
    return losses, distill, *grads


def _gradient_terms(queries, docs, dims, options):
    """The size of the terms a gradient sums: ``scale * |y| / |x[:d]|`` for the cosine of the narrowest
    prefix (``d/dx cos = (y_hat - cos x_hat) / |x|``), ``scale * |y|`` for the dot product."""
    rows = torch.cat([queries, docs], 1)
    widest = rows.norm(dim=-1).max().item()
    if options["similarity"] == "dot":
        return options["scale"] * widest
    narrowest = rows[..., :dims[0]].norm(dim=-1).min().item()
    return options["scale"] / max(narrowest, 1e-30)


def _names_an_argument(error):
    return any(name in str(error) for name in ARGUMENTS)


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=calls())
def test_every_call_matches_the_oracle_or_names_its_bad_argument(call):
    backend, dtype, layout, options, seed = call
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    queries, docs, guide, positive_index = _embeddings(layout, seed)
    low_q, low_d = queries.to(dtype), docs.to(dtype)
    args = (layout["dims"], options)
    try:
        truth = _call(low_q.double(), low_d.double(), *args, "reference", guide, positive_index)
    except (ValueError, TypeError) as error:  # the options are invalid: every backend must say so, naming them
        event(f"invalid: {str(error)[:40]}")
        assert _names_an_argument(error), f"the error names no argument: {error}"
        with pytest.raises(type(error)) as raised:
            _call(low_q, low_d, *args, backend, guide, positive_index)
        assert _names_an_argument(raised.value), f"the error names no argument: {raised.value}"
        return
    event(f"compared: {backend} {str(dtype)[6:]}")
    for option in ("guide_margin", "hardness_mode", "distill_weights", "weights"):
        if options.get(option) is not None:
            event(f"compared with {option}")
    event(f"compared: {'+'.join(d.split('_')[0][0] + '2' + d.split('_')[2][0] for d in options['directions'])}")
    got = _call(low_q, low_d, *args, backend, guide, positive_index)
    reference_low = None
    if dtype not in BOUND:  # fp16/bf16: no worse than twice the reference's own error in that dtype
        reference_low = _call(low_q, low_d, *args, "reference", guide, positive_index)
    for i, name in enumerate(("losses", "distill", "grad_queries", "grad_docs")):
        if truth[i] is None:
            assert got[i] is None, name
            continue
        assert got[i].dtype == dtype and got[i].shape == truth[i].shape, name
        want, have = truth[i], got[i].double()
        assert torch.isfinite(have).all() == torch.isfinite(want).all(), f"{name}: {have} vs {want}"
        largest = want.abs().max().item() if want.numel() else 0.0
        error = (have - want).abs().max().item() if want.numel() else 0.0
        if reference_low is None:
            bound = BOUND[dtype] * max(largest, 1.0)
        else:
            # The floor: one rounding of that dtype, of the largest term a gradient sums, which a degenerate
            # shape cancels exactly in the reference (a 1-wide prefix: every cosine is +-1, the gradient 0).
            terms = _gradient_terms(low_q.double(), low_d.double(), layout["dims"], options) if name.startswith(
                "grad") else 1.0
            floor = torch.finfo(dtype).eps * max(largest, 1.0, terms)
            bound = 2 * (reference_low[i].double() - want).abs().max().item() + floor
        assert error <= bound, f"{name}: error {error:.3g} > {bound:.3g} ({backend}, {dtype}, {layout}, {options})"
