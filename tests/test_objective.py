"""The loss family (m2d_kernels.objective): directions, partitions, hardness, dot, guide, distillation.

Three layers of evidence, each against something independent:

1. the ``reference`` oracle (``reference.objective_losses``) against sentence-transformers' own
   ``MultipleNegativesRankingLoss.compute_loss_from_embeddings`` and ``GISTEmbedLoss.forward`` per
   (layer, dim) pair, and against a hand-written ``F.kl_div`` for distillation;
2. the composition of passes (``objective.objective_losses`` driving the reference *pass* API, which
   materialises one block per pass) against that oracle, every option;
3. every fused backend's passes through the same composition against the oracle (float64; Triton
   under the interpreter in float32), plus a 2-process gather test.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import init_process_group, spawn
from helpers import make_inputs
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.losses import gist_embed as gist_module
from sentence_transformers.util import cos_sim, dot_score
from st_helpers import tiny_model, write_tiny_bert

import m2d_kernels as m2d
from m2d_kernels import objective
from m2d_kernels.backends import reference
from m2d_kernels.integrations.sentence_transformers import GIST_EXCLUDES_SELF
from m2d_kernels.numerics import inverse_prefix_norms

N_LAYERS, N_QUERIES, N_FEATURES = 2, 5, 24
DIMS = (5, 16, 24)
ACTIVE = ((True, True, True), (True, False, True))
WEIGHTS = ((1.0, 0.5, 2.0), (0.25, 0.0, 1.0))
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")

# One case per line: every direction set, both partitions, every hardness mode, both similarities.
MNRL_CASES = [
    dict(directions=("query_to_doc",)),
    dict(directions=("query_to_doc",), similarity="dot"),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", similarity="dot"),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="joint"),
    dict(directions=("query_to_doc", "query_to_query"), hardness_mode="in_batch_negatives", hardness_strength=9.0),
    dict(directions=("query_to_doc", "doc_to_doc"), similarity="dot", hardness_mode="hard_negatives",
         hardness_strength=5.0),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query"), hardness_mode="all_negatives",
         hardness_strength=0.5),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query")),  # merged: queries' rows, 2B columns
    dict(directions=ALL_DIRECTIONS),
    dict(directions=ALL_DIRECTIONS, similarity="dot", hardness_mode="all_negatives", hardness_strength=2.0),
]
GUIDE_CASES = [
    dict(directions=("query_to_doc",), guide_margin=0.0, guide_margin_strategy="absolute"),
    dict(directions=("query_to_doc", "query_to_query"), guide_margin=0.1, guide_margin_strategy="absolute"),
    dict(directions=("query_to_doc", "doc_to_doc"), guide_margin=0.1, guide_margin_strategy="relative"),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_doc"), guide_margin=0.0,
         guide_margin_strategy="relative"),
    # A wide relative margin where g_0 < 0: the threshold is 2 g_0, not 0 (|g| matters).
    dict(directions=("query_to_doc", "query_to_query"), guide_margin=1.0, guide_margin_strategy="relative"),
]
DISTILL = ((0.5, 0.0, 1.0), (2.0, 0.0, 0.0))
DISTILL_CASES = [
    dict(directions=("query_to_doc",), distill_weights=DISTILL),
    dict(directions=("query_to_doc",), similarity="dot", distill_weights=DISTILL),
    dict(directions=ALL_DIRECTIONS, hardness_mode="in_batch_negatives", hardness_strength=3.0,
         distill_weights=DISTILL),
]


def _scale(case):
    return 0.3 if case.get("similarity") == "dot" else 20.0


def _inputs(n_groups, seed, guide=False, dtype=torch.float64):
    queries, docs = make_inputs(N_LAYERS, N_QUERIES, n_groups * N_QUERIES, N_FEATURES, seed=seed, dtype=dtype)
    if not guide:
        return queries, docs, None
    generator = torch.Generator().manual_seed(seed + 7)
    guide_queries = torch.randn(N_QUERIES, 6, generator=generator, dtype=torch.float64)
    guide_docs = torch.randn(n_groups * N_QUERIES, 6, generator=generator, dtype=torch.float64)
    guide_docs[:N_QUERIES] += guide_queries  # positives close: some candidates above the threshold, some below
    guide_docs[0] -= 3 * guide_queries[0]  # g_0 < 0: "relative" margins differ from "absolute" ones in sign
    guide_docs[(N_QUERIES + 1) % len(guide_docs)] = 3 * guide_queries[1]  # a near-duplicate candidate, dropped
    return queries, docs, (guide_queries, guide_docs)


def _objective(case, guide=None):
    case = dict(case)
    if guide is not None:
        case["guide_queries"], case["guide_docs"] = guide
    return objective.Objective(**case)


# --- 1. the oracle against sentence-transformers ------------------------------------------------------


@pytest.mark.parametrize("case", MNRL_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("n_groups", [1, 3])
def test_oracle_matches_sentence_transformers_mnrl(case, n_groups):
    if n_groups == 1 and case.get("hardness_mode") == "hard_negatives":
        pytest.skip("no hard negatives: the mode has nothing to weight (covered with n_groups=3)")
    queries, docs, _ = _inputs(n_groups, seed=11)
    scale = _scale(case)
    ours = m2d.matryoshka_2d_infonce(queries, docs, DIMS, WEIGHTS, scale=scale, reduction="none",
                                     backend="reference", **case)
    st_loss = MultipleNegativesRankingLoss(
        None, scale=scale, similarity_fct=dot_score if case.get("similarity") == "dot" else cos_sim,
        directions=case["directions"], partition_mode=case.get("partition_mode", "joint"),
        hardness_mode=case.get("hardness_mode"), hardness_strength=case.get("hardness_strength", 0.0))
    for layer in range(N_LAYERS):
        for m, dim in enumerate(DIMS):
            if WEIGHTS[layer][m] == 0:
                assert ours[layer, m] == 0
                continue
            columns = [queries[layer, :, :dim]] + list(docs[layer, :, :dim].split(N_QUERIES))
            expected = st_loss.compute_loss_from_embeddings(columns, None)
            torch.testing.assert_close(ours[layer, m], expected, rtol=1e-12, atol=1e-12)
            got_grads = torch.autograd.grad(ours[layer, m], (queries, docs), retain_graph=True)
            want_grads = torch.autograd.grad(expected, (queries, docs))
            for got, want in zip(got_grads, want_grads):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def gist_models(tmp_path_factory):
    """A tiny real model and guide (one tokenizer: GIST does not re-tokenise), built from a config."""
    bert = write_tiny_bert(tmp_path_factory.mktemp("gist-bert"))
    return tiny_model(bert, seed=1), tiny_model(bert, seed=2)


@pytest.mark.parametrize("case", GUIDE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("n_groups", [1, 2])
def test_oracle_matches_sentence_transformers_gist(case, n_groups, gist_models, monkeypatch):
    queries, docs, guide = _inputs(n_groups, seed=12, guide=True)
    scale = 20.0
    ours = m2d.matryoshka_2d_infonce(queries, docs, DIMS, scale=scale, reduction="none", backend="reference",
                                     guide=guide, guide_exclude_self=GIST_EXCLUDES_SELF, **case)
    model, guide_model = gist_models
    gist = GISTEmbedLoss(model, guide_model, temperature=1 / scale, margin_strategy=case["guide_margin_strategy"],
                         margin=case["guide_margin"], contrast_anchors="query_to_query" in case["directions"],
                         contrast_positives="doc_to_doc" in case["directions"])
    # GISTEmbedLoss.forward embeds the columns itself: its model's become ours, its guide's the guide's.
    guide_columns = [guide[0]] + list(guide[1].split(N_QUERIES))
    for layer in range(N_LAYERS):
        for m, dim in enumerate(DIMS):
            columns = [queries[layer, :, :dim]] + list(docs[layer, :, :dim].split(N_QUERIES))
            monkeypatch.setattr(gist_module, "embed_columns",
                                lambda who, features, columns=columns: columns if who is model else guide_columns)
            expected = gist.forward([{}] * len(columns), None)
            torch.testing.assert_close(ours[layer, m], expected, rtol=1e-12, atol=1e-12)
            got_grads = torch.autograd.grad(ours[layer, m], (queries, docs), retain_graph=True)
            want_grads = torch.autograd.grad(expected, (queries, docs))
            for got, want in zip(got_grads, want_grads):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_oracle_distillation_matches_kl_div(similarity):
    queries, docs, _ = _inputs(2, seed=13)
    scale = _scale({"similarity": similarity})
    losses, distill = m2d.matryoshka_2d_infonce(queries, docs, DIMS, WEIGHTS, scale=scale, similarity=similarity,
                                                distill_weights=DISTILL, reduction="none", backend="reference")

    def logits(layer, dim):
        q, k = queries[layer, :, :dim], docs[layer, :, :dim]
        if similarity == "cos":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return scale * q @ k.T

    teacher = F.softmax(logits(N_LAYERS - 1, DIMS[-1]).detach(), dim=1)
    for layer in range(N_LAYERS):
        for m, dim in enumerate(DIMS):
            expected = F.kl_div(F.log_softmax(logits(layer, dim), dim=1), teacher, reduction="batchmean")
            if DISTILL[layer][m] == 0:
                assert distill[layer, m] == 0
                continue
            torch.testing.assert_close(distill[layer, m], expected, rtol=1e-12, atol=1e-13)
            got = torch.autograd.grad(distill[layer, m], (queries, docs), retain_graph=True)
            want = torch.autograd.grad(expected, (queries, docs))
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    total = m2d.matryoshka_2d_infonce(queries, docs, DIMS, WEIGHTS, scale=scale, similarity=similarity,
                                      distill_weights=DISTILL, backend="reference")
    torch.testing.assert_close(total, (losses * torch.tensor(WEIGHTS, dtype=torch.float64)).sum()
                               + (distill * torch.tensor(DISTILL, dtype=torch.float64)).sum())


# --- 2. and 3. passes composed, every backend, against the oracle ------------------------------------------


def _pass_backend(name):
    if name in ("reference-passes", "reference-shared"):  # the composition over the reference's materialised passes
        shares = name == "reference-shared"
        return types.SimpleNamespace(row_statistics=reference.row_statistics, pass_gradients=reference.pass_gradients,
                                     shares_tiles=lambda similarity, scale=None: shares)
    reason = m2d.backends.unavailable_reason(name, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    impl = m2d.backends.resolve(name, torch.device("cpu"))
    return impl


def _compare(impl, case, n_groups, seed, dtype=torch.float64, guide=False):
    queries, docs, guide_tensors = _inputs(n_groups, seed, guide=guide)
    obj = _objective(case, guide_tensors)
    scale = _scale(case)
    positives = torch.arange(N_QUERIES)
    generator = torch.Generator().manual_seed(seed + 3)
    loss_weights = torch.rand(N_LAYERS, len(DIMS), generator=generator, dtype=torch.float64)
    distill_weights = torch.rand(N_LAYERS, len(DIMS), generator=generator, dtype=torch.float64)
    results = []
    low_q, low_d = (x.detach().to(dtype).requires_grad_() for x in (queries, docs))
    for backend, x, y in ((reference, queries, docs), (impl, low_q, low_d)):
        # The default layout: a backend that shares tiles composes the joint directions from them.
        result = objective.objective_losses(backend, x, y, DIMS, ACTIVE, scale, positives, obj, leading_positives=True)
        losses, distill = result.losses, result.distill
        total = (losses.double() * loss_weights).sum()
        if distill is not None:
            total = total + (distill.double() * distill_weights).sum()
        grads = torch.autograd.grad(total, (x, y))
        results.append((losses.double(), None if distill is None else distill.double(), *(g.double() for g in grads)))
    tolerance = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for name, want, got in zip(("losses", "distill", "grad_queries", "grad_docs"), *results):
        if want is not None:
            torch.testing.assert_close(got, want, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


# The fused backends in float64, Triton (under the interpreter on the CPU) in float32.
PASS_BACKENDS = ["reference-passes", "reference-shared", "torch", "cpp", "triton"]
DTYPES = {"triton": torch.float32}


def _supports_rules(impl):
    return "rules" in inspect.signature(impl.row_statistics).parameters


@pytest.mark.parametrize("backend", PASS_BACKENDS)
@pytest.mark.parametrize("case", MNRL_CASES + DISTILL_CASES, ids=lambda c: "-".join(f"{v}"[:12] for v in c.values()))
def test_passes_match_oracle(backend, case):
    impl = _pass_backend(backend)
    if not _supports_rules(impl):
        pytest.skip(f"{backend}: pass rules not implemented")
    _compare(impl, case, n_groups=3, seed=21, dtype=DTYPES.get(backend, torch.float64))


@pytest.mark.parametrize("backend", PASS_BACKENDS)
@pytest.mark.parametrize("case", GUIDE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_guided_passes_match_oracle(backend, case):
    impl = _pass_backend(backend)
    if not _supports_rules(impl):
        pytest.skip(f"{backend}: pass rules not implemented")
    _compare(impl, case, n_groups=2, seed=22, guide=True, dtype=DTYPES.get(backend, torch.float64))


# (case, merged): whether the joint directions are one pass over [queries; docs] (objective._merged_pass) rather
# than up to three (objective._shared_passes).
SHARED_CASES = [
    (dict(directions=ALL_DIRECTIONS), True),
    (dict(directions=ALL_DIRECTIONS, similarity="dot"), True),
    (dict(directions=("query_to_doc", "query_to_query")), True),
    (dict(directions=("query_to_doc", "query_to_query", "doc_to_query")), True),
    (dict(directions=ALL_DIRECTIONS, similarity="dot", hardness_mode="hard_negatives", hardness_strength=2.0), False),
    (dict(directions=("query_to_doc", "doc_to_query"), hardness_mode="in_batch_negatives", hardness_strength=1.0),
     False),
    (dict(directions=("query_to_doc", "query_to_query", "doc_to_doc")), False),  # doc_to_doc needs doc_to_query
]


@pytest.mark.parametrize("backend", ["reference-shared", "torch", "cpp"])
@pytest.mark.parametrize("case, merged", SHARED_CASES,
                         ids=lambda c: "-".join(f"{v}"[:12] for v in c.values()) if isinstance(c, dict) else f"{c}")
@pytest.mark.parametrize("n_queries, n_groups", [(133, 2), (70, 1)])
def test_shared_tiles_across_blocks_match_oracle(backend, case, merged, n_queries, n_groups, monkeypatch):
    """Joint directions from shared tiles (triangle Gram blocks, column statistics), merged into one pass over
    [queries; docs] where the case allows it, at batches that cross the backends' row blocks and chunks,
    against the oracle; the composition must be the one expected."""
    impl = _pass_backend(backend)
    if not impl.shares_tiles("cos"):
        pytest.skip(f"{backend}: no shared tiles")
    monkeypatch.setattr(objective, "_passes", lambda *a, **k: pytest.fail("took one pass per direction"))
    unexpected = "_shared_passes" if merged else "_merged_pass"
    monkeypatch.setattr(objective, unexpected, lambda *a, **k: pytest.fail(f"took {unexpected}"))
    queries, docs = make_inputs(1, n_queries, n_groups * n_queries, 16, seed=31, dtype=torch.float64)
    scale = _scale(case)
    obj = objective.Objective(**case)
    results = []
    for backend_impl in (reference, impl):
        x, y = queries.detach().clone().requires_grad_(), docs.detach().clone().requires_grad_()
        losses = objective.objective_losses(backend_impl, x, y, (8, 16), ((True, True),), scale,
                                            torch.arange(n_queries), obj, leading_positives=True).losses
        grads = torch.autograd.grad((losses * torch.tensor([[0.7, 1.3]], dtype=torch.float64)).sum(), (x, y))
        results.append((losses, *grads))
    for name, got, want in zip(("losses", "grad_queries", "grad_docs"), results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_pass_api_takes_precomputed_norms(backend):
    """``norms`` (the objective computes each tensor's inverse-norm tables once for all its passes): the pass
    statistics and gradients with given tables equal the oracle's, which computes its own; tables of the
    wrong shape are a ValueError naming ``norms``."""
    impl = _pass_backend(backend)
    dtype = DTYPES.get(backend, torch.float64)
    queries, docs = make_inputs(2, 37, 74, 16, seed=33, dtype=dtype)
    dims, active, scale = (8, 16), ((True, True), (False, True)), 20.0
    positives = torch.arange(37)
    rules = objective.Rules(column_statistics=37)
    norms = tuple(inverse_prefix_norms(x, dims, torch.float64) for x in (queries, docs))
    got = impl.row_statistics(queries, docs, dims, active, scale, positives, rules, norms=norms)
    want = reference.row_statistics(queries.double(), docs.double(), dims, active, scale, positives, rules)
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    on = torch.tensor(active)[:, None, :]  # inactive pairs' statistics are the backend's own

    def log_sum_exps(stats):  # offsets differ (fixed or running maximum): compare offset + log_sum
        return [torch.where(on, t.double(), 0.0) for t in (stats.rows.offset + stats.rows.log_sum,
                                                           stats.positive_logit,
                                                           stats.columns.offset + stats.columns.log_sum)]

    for g, w in zip(log_sum_exps(got), log_sum_exps(want)):
        torch.testing.assert_close(g, w, **tolerance)
    want_stats = want
    coef = torch.full((2, 2), 1.0 / 37, dtype=torch.float64)
    got = impl.pass_gradients(queries, docs, dims, active, scale, positives, want.rows, coef, rules,
                              columns=want.columns, norms=norms)
    want = reference.pass_gradients(queries.double(), docs.double(), dims, active, scale, positives, want.rows,
                                    coef, rules, columns=want.columns)
    for g, w in ((got.rows, want.rows), (got.cols, want.cols)):
        torch.testing.assert_close(g.double(), w, **tolerance)
    halved = tuple((inverse / 2, factor) for inverse, factor in norms)  # the given tables are the ones used
    stats = impl.row_statistics(queries, docs, dims, active, scale, positives, rules, norms=halved)
    assert not torch.allclose(log_sum_exps(stats)[0], log_sum_exps(want_stats)[0], rtol=1e-3)
    wrong = (norms[0], tuple(t[:, :10] for t in norms[1]))
    with pytest.raises(ValueError, match="norms"):
        impl.row_statistics(queries, docs, dims, active, scale, positives, rules, norms=wrong)


def test_every_candidate_filtered_but_the_positive():
    """A guide that drops every in-batch candidate: the loss of such a row is 0 (only the positive is left)."""
    queries, docs, _ = _inputs(1, seed=23)
    guide_queries = torch.ones(N_QUERIES, 3, dtype=torch.float64)
    guide_docs = torch.ones(N_QUERIES, 3, dtype=torch.float64)  # every guide cosine is 1 > 1 - margin
    for backend in ["reference"] + [b for b in ("torch", "cpp") if _supports_rules(_pass_backend(b))]:
        losses = m2d.matryoshka_2d_infonce(queries, docs, DIMS, scale=20.0, guide=(guide_queries, guide_docs),
                                           guide_margin=0.1, directions=("query_to_doc", "query_to_query"),
                                           reduction="none", backend=backend)
        torch.testing.assert_close(losses, torch.zeros_like(losses), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_symmetric_default_is_one_pass_with_column_statistics(backend, monkeypatch):
    """The symmetric default loss in the default layout is one pass whose first B columns' statistics are
    doc_to_query's rows (no second pass), and it equals the oracle; with a given positive_index it is two."""
    impl = _pass_backend(backend)
    queries, docs, _ = _inputs(2, seed=24)
    calls = []
    row_statistics = impl.row_statistics

    def counted(rows, cols, *args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("rules"))
        return row_statistics(rows, cols, *args, **kwargs)

    monkeypatch.setattr(impl, "row_statistics", counted)
    for positive_index, n_passes in ((None, 1), (torch.arange(N_QUERIES), 2)):
        calls.clear()
        x, y = queries.detach().clone().requires_grad_(), docs.detach().clone().requires_grad_()
        got = m2d.matryoshka_2d_infonce(x, y, DIMS, positive_index=positive_index, symmetric=True, backend=backend,
                                        reduction="none")
        assert len(calls) == n_passes
        if n_passes == 1:
            assert calls[0].column_statistics == N_QUERIES
        got_grads = torch.autograd.grad(got.sum(), (x, y))
        x, y = queries.detach().clone().requires_grad_(), docs.detach().clone().requires_grad_()
        want = m2d.matryoshka_2d_infonce(x, y, DIMS, positive_index=positive_index, symmetric=True,
                                         backend="reference", reduction="none")
        want_grads = torch.autograd.grad(want.sum(), (x, y))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(directions=("doc_to_query",)), ValueError, "include 'query_to_doc'"),
    (dict(directions=("query_to_doc", "sideways")), ValueError, "directions must be"),
    (dict(directions="query_to_doc"), TypeError, "directions must be a sequence"),
    (dict(directions=("query_to_doc", "query_to_doc")), ValueError, "repeat"),
    (dict(directions=("query_to_doc", "doc_to_doc"), partition_mode="per_direction"), ValueError, "per_direction"),
    (dict(partition_mode="both"), ValueError, "partition_mode"),
    (dict(similarity="l2"), ValueError, "similarity"),
    (dict(hardness_mode="hardest", hardness_strength=1.0), ValueError, "hardness_mode"),
    (dict(hardness_mode="all_negatives", hardness_strength=-1.0), ValueError, "hardness_strength"),
    (dict(symmetric=True, directions=("query_to_doc", "doc_to_query")), ValueError, "either symmetric"),
    (dict(guide=(torch.ones(3, 2),)), TypeError, "guide must be a pair"),
    (dict(guide=(torch.ones(4, 2, dtype=torch.float64), torch.ones(10, 2, dtype=torch.float64))), ValueError,
     "guide must be"),
    (dict(guide="G", guide_margin_strategy="square"), ValueError, "guide_margin_strategy"),
    (dict(guide="G", directions=("query_to_doc", "doc_to_query")), ValueError, "doc_to_query"),
    (dict(distill_weights=((1.0,),)), ValueError, "distill_weights must have shape"),
    (dict(distill_weights=((-1.0, 0, 0), (0, 0, 0))), ValueError, "non-negative"),
    (dict(distill_weights=DISTILL, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
     ValueError, "joint"),
    (dict(directions=("query_to_doc", "doc_to_doc"), positive_index=torch.arange(N_QUERIES)), ValueError, "layout"),
    (dict(similarity="dot", gather_across_devices="ring"), ValueError, "ring"),
    (dict(similarity="dot", scale=torch.tensor(2.0, dtype=torch.float64, requires_grad=True)), ValueError,
     "learnable scale"),
])
def test_bad_options_raise(kwargs, error, match):
    queries, docs, guide = _inputs(2, seed=25, guide=True)
    if kwargs.get("guide") == "G":
        kwargs = {**kwargs, "guide": guide}
    with pytest.raises(error, match=match):
        m2d.matryoshka_2d_infonce(queries, docs, DIMS, backend="reference", **kwargs)


# --- gather_across_devices ---------------------------------------------------------------------------------


def _gather_worker(rank, world_size, port, queries, docs, guide, case, backends, results):
    init_process_group(rank, world_size, port)
    try:
        b = N_QUERIES
        n_groups = docs.shape[1] // (world_size * b)
        rows = torch.arange(world_size * b * n_groups).view(n_groups, world_size, b)[:, rank].reshape(-1)
        local_q = queries[:, rank * b:(rank + 1) * b].clone().requires_grad_()
        local_d = docs[:, rows].clone().requires_grad_()
        kwargs = dict(case)
        if guide is not None:
            kwargs["guide"] = (guide[0][rank * b:(rank + 1) * b], guide[1][rows])
        for backend in backends:
            local_q.grad = local_d.grad = None
            loss = m2d.matryoshka_2d_infonce(local_q, local_d, DIMS, WEIGHTS, scale=_scale(case), backend=backend,
                                             gather_across_devices=True, **kwargs)
            loss.backward()
            results[f"{rank}-{backend}"] = (loss.detach(), local_q.grad.clone(), local_d.grad.clone(), rows)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", [MNRL_CASES[-1], dict(directions=("query_to_doc", "query_to_query", "doc_to_doc"),
                                                       guide_margin=0.05)], ids=["mnrl-all", "gist"])
def test_gather_across_devices_matches_one_process(case):
    """Two gloo ranks, each its shard: sum of rank losses = W x the loss of the concatenated batch; every
    rank's gradient = W x the global gradient of its rows (the all-gather sums all ranks' losses)."""
    world_size, n_groups = 2, 2
    guided = "guide_margin" in case
    generator = torch.Generator().manual_seed(31)
    queries = torch.randn(N_LAYERS, world_size * N_QUERIES, N_FEATURES, generator=generator, dtype=torch.float64)
    docs = torch.randn(N_LAYERS, world_size * N_QUERIES * n_groups, N_FEATURES, generator=generator,
                       dtype=torch.float64)
    docs[:, :world_size * N_QUERIES] += queries
    guide = None
    if guided:
        guide = (torch.randn(world_size * N_QUERIES, 4, generator=generator, dtype=torch.float64),
                 torch.randn(world_size * N_QUERIES * n_groups, 4, generator=generator, dtype=torch.float64))
        guide[1][:world_size * N_QUERIES] += guide[0]
    backends = ["reference"] + (["torch"] if _supports_rules(_pass_backend("torch")) else [])
    results = torch.multiprocessing.Manager().dict()
    spawn(_gather_worker, world_size, queries, docs, guide, case, backends, results)
    if guided:
        # GIST under gather scores the local anchors only in its anchor-anchor block: compare ranks with the
        # oracle run on each rank's view instead of one global batch; the torch passes must equal the reference.
        for rank in range(world_size * ("torch" in backends)):
            for got, want in zip(results[f"{rank}-torch"][:3], results[f"{rank}-reference"][:3]):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        return
    q, d = queries.clone().requires_grad_(), docs.clone().requires_grad_()
    loss = m2d.matryoshka_2d_infonce(q, d, DIMS, WEIGHTS, scale=_scale(case), backend="reference", **case)
    loss.backward()
    for backend in backends:
        total = sum(results[f"{r}-{backend}"][0] for r in range(world_size))
        torch.testing.assert_close(total, world_size * loss.detach(), rtol=1e-9, atol=1e-11)
        for rank in range(world_size):
            _, grad_q, grad_d, rows = results[f"{rank}-{backend}"]
            torch.testing.assert_close(grad_q, world_size * q.grad[:, rank * N_QUERIES:(rank + 1) * N_QUERIES],
                                       rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(grad_d, world_size * d.grad[:, rows], rtol=1e-9, atol=1e-11)


def test_module_passes_the_options_through():
    queries, docs, guide = _inputs(2, seed=26, guide=True)
    options = dict(directions=("query_to_doc", "query_to_query"), hardness_mode="all_negatives",
                   hardness_strength=1.5, guide_margin=0.05, distill_weights=DISTILL)
    module = m2d.Matryoshka2dInfoNCELoss(DIMS, WEIGHTS, scale=20.0, backend="reference", **options)
    expected = m2d.matryoshka_2d_infonce(queries, docs, DIMS, WEIGHTS, scale=20.0, backend="reference", guide=guide,
                                         **options)
    torch.testing.assert_close(module(queries, docs, guide=guide), expected, rtol=0, atol=0)
    assert "hardness_mode='all_negatives'" in repr(module)
    with pytest.raises(TypeError, match="unknown options"):
        m2d.Matryoshka2dInfoNCELoss(DIMS, direction=("query_to_doc",))


# --- Guide ties and the row itself (sentence-transformers 6.3) ----------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp", "triton"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_a_guide_that_ties_every_candidate_drops_nothing(backend, exclude_self):
    """Every guide vector is one direction times a different factor, so every candidate's guide cosine equals
    the positive's up to rounding (which differs between the threshold's row sum and a backend's GEMM): all
    ties, so nothing is dropped. With ``guide_exclude_self`` the anchor-anchor and positive-positive blocks drop
    the row itself (sentence-transformers >= 6.3), otherwise they keep it. Truth: one cross-entropy over the
    three blocks written here (N = B, so doc_to_doc's block is the positives')."""
    reason = m2d.backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    dtype = DTYPES.get(backend, torch.float64)
    queries, docs, _ = _inputs(1, seed=31)
    generator = torch.Generator().manual_seed(32)
    direction = torch.randn(7, generator=generator, dtype=torch.float64)
    factors = torch.rand(2 * N_QUERIES, generator=generator, dtype=torch.float64) * 3 + 0.1
    guide = (factors[:N_QUERIES, None] * direction, factors[N_QUERIES:, None] * direction)
    directions, scale = ("query_to_doc", "query_to_query", "doc_to_doc"), 20.0
    got = m2d.matryoshka_2d_infonce(queries.to(dtype), docs.to(dtype), DIMS, scale=scale, directions=directions,
                                    guide=guide, guide_exclude_self=exclude_self, reduction="none", backend=backend)
    for layer in range(N_LAYERS):
        for m, dim in enumerate(DIMS):
            q = F.normalize(queries[layer, :, :dim], dim=-1)
            k = F.normalize(docs[layer, :, :dim], dim=-1)
            self_entry = torch.eye(N_QUERIES, dtype=torch.bool) & exclude_self
            blocks = [q @ k.T, (q @ q.T).masked_fill(self_entry, -torch.inf),
                      (k @ k.T).masked_fill(self_entry, -torch.inf)]
            expected = F.cross_entropy(scale * torch.cat(blocks, 1), torch.arange(N_QUERIES))
            tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
            torch.testing.assert_close(got[layer, m].double(), expected, **tolerance)
