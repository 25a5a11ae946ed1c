"""The torch backend's pass with rules (rules.py) against the float64 reference pass.

Every rule of one rows-vs-columns pass (similarity cos/dot, exclusion of the row's own column or
group, the three penalty classes, guided filtering, teacher sums and the distillation gradient)
on the chunked torch pass: ``row_statistics`` (the log-sum-exp ``offset + log_sum``, since offsets
may differ legitimately; the positive logits; the teacher sums as ``E_{p_T}[z]``, since they are
relative to the offset) and ``pass_gradients`` (both gradients, random ``coef`` and
``distill_coef``, statistics from the reference), float64, against
``m2d_kernels.backends.reference``, which materialises each pair's ``[R, C]`` logits.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_PASS_MODES, assert_close, make_inputs

from m2d_kernels.backends import reference
from m2d_kernels.backends import torch_prefix as backend
from m2d_kernels.rules import PLAIN, Rules

SHAPES = {48: (5, 20, 48), 100: (7, 33, 100)}  # D -> nested dims, not multiples of 16


def make_case(n_rows, n_cols, n_features, similarity="cos", exclusion=None, penalty=None, strength=0.0,
              guided=False, teacher=False, n_layers=2, seed=0, dtype=torch.float64):
    """Rows, columns, positives and rules in sentence-transformers' layout: G = R groups, column j in
    group j % G, row i in group i; the positive of row i is its own column i, or with an exclusion
    (which drops the own group) column (i + 1) % G; row 1 has its positive in another block (-1)."""
    rows, cols = make_inputs(n_layers, n_rows, n_cols, n_features, seed=seed, requires_grad=False)
    group_period = n_rows
    row_group = torch.arange(n_rows)
    if exclusion is None:
        positives = torch.arange(n_rows)
    else:
        positives = (torch.arange(n_rows) + 1) % group_period if group_period > 1 else torch.full((n_rows,), -1)
    if n_rows > 1:
        positives[1] = -1
    guide = {}
    if guided:
        generator = torch.Generator().manual_seed(seed + 1)
        guide_rows = F.normalize(torch.randn(n_rows, 7, generator=generator, dtype=torch.float64), dim=-1)
        guide_cols = torch.randn(n_cols, 7, generator=generator, dtype=torch.float64)
        # The positive scores high on the guide (as in GIST): the rule must never drop it.
        kept = positives >= 0
        guide_cols[positives[kept]] = guide_rows[kept] + 0.3 * guide_cols[positives[kept]]
        guide_cols = F.normalize(guide_cols, dim=-1)
        similarities = (guide_rows @ guide_cols.T).sort(1).values
        # Midway between two sorted guide similarities: about a third of the columns masked, no ties.
        k = (2 * n_cols) // 3
        threshold = (similarities[:, k - 1] + similarities[:, min(k, n_cols - 1)]) / 2 if n_cols > 1 else \
            similarities[:, 0] + 0.5
        if n_rows > 2:
            threshold[-1] = -2.0  # every column of the last row masked
            positives[-1] = -1
        guide = dict(guide_rows=guide_rows, guide_cols=guide_cols, guide_threshold=threshold)
    rules = Rules(similarity=similarity, group_period=group_period, row_group=row_group,
                  exclude_own_group=exclusion is not None, penalty=penalty, penalty_strength=strength,
                  teacher=teacher, **guide)
    return rows.to(dtype), cols.to(dtype), positives, rules


def check_pass(rows, cols, dims, active, scale, positives, rules, seed=0, tolerance_dtype=torch.float64):
    """row_statistics and pass_gradients of the torch backend against the reference's."""
    n_layers, n_dims = len(active), len(dims)
    rows64, cols64 = rows.double(), cols.double()
    expected = reference.row_statistics(rows64, cols64, dims, active, scale, positives, rules)
    got = backend.row_statistics(rows, cols, dims, active, scale, positives, rules)
    assert len(got) == len(expected) == (4 if rules.teacher else 3)
    on = torch.tensor(active)[:, None, :].expand(n_layers, rows.shape[1], n_dims)
    for name, tensor in zip(("offset", "log_sum", "positive"), got):
        assert torch.isfinite(tensor[on.logical_not()]).all(), f"{name}: inactive pairs must be finite"
    assert torch.isfinite(got[0]).all(), "offset must be finite"
    lse, expected_lse = (got[0] + got[1])[on], (expected[0] + expected[1])[on]
    empty = torch.isneginf(expected_lse)
    assert torch.equal(torch.isneginf(lse), empty), "log_sum -inf exactly where every column is excluded"
    assert_close(lse[~empty], expected_lse[~empty], tolerance_dtype, "log-sum-exp")
    assert_close(got[2], expected[2], tolerance_dtype, "positive logit")
    if rules.teacher:
        # Relative to each backend's own teacher offset: divide by the teacher's exp(log_sum) to get E_pT[z].
        teacher_total, expected_teacher_total = got[1][-1, :, -1].exp(), expected[1][-1, :, -1].exp()
        kept = expected_teacher_total > 0
        assert (got[3][:, ~kept] == 0).all(), "teacher sums of a row with no kept column"
        assert_close((got[3] / teacher_total[None, :, None])[:, kept],
                     (expected[3] / expected_teacher_total[None, :, None])[:, kept], tolerance_dtype, "teacher sums")

    generator = torch.Generator().manual_seed(seed)
    coef = torch.rand(n_layers, n_dims, generator=generator, dtype=torch.float64)
    coef[0, 0] = 0.0  # a zero weight
    distill_coef = None
    if rules.teacher:
        distill_coef = torch.rand(n_layers, n_dims, generator=generator, dtype=torch.float64)
        distill_coef[0, -1] = 0.0
    offset, log_sum = expected[0], expected[1]
    expected_grads = reference.pass_gradients(rows64, cols64, dims, active, scale, positives, offset, log_sum, coef,
                                              rules, distill_coef)
    acc = backend.accumulator_dtype(rows.dtype)
    got_grads = backend.pass_gradients(rows, cols, dims, active, scale, positives, offset.to(acc), log_sum.to(acc),
                                       coef.to(acc), rules, None if distill_coef is None else distill_coef.to(acc))
    for name, g, e in zip(("d rows", "d cols"), got_grads, expected_grads):
        assert g.dtype == acc and g.shape == e.shape
        assert torch.isfinite(g).all(), f"{name}: not finite"
        assert_close(g, e, tolerance_dtype, name)


# The grid of rules: similarity x exclusion x penalty x guided x teacher, R = 5, D = 48.
RULE_GRID = list(itertools.product(("cos", "dot"), (None, "self", "groups"),
                                   (None, "in_batch_negatives", "hard_negatives", "all_negatives"),
                                   (False, True), (False, True)))


@pytest.mark.parametrize("similarity,exclusion,penalty,guided,teacher", RULE_GRID)
def test_rules_grid_matches_reference(similarity, exclusion, penalty, guided, teacher):
    n_rows = 5
    n_cols = n_rows if exclusion == "self" else 3 * n_rows
    rows, cols, positives, rules = make_case(n_rows, n_cols, 48, similarity, exclusion, penalty, 9.0, guided, teacher)
    scale = 20.0 if similarity == "cos" else 1.0
    check_pass(rows, cols, SHAPES[48], ((True, False, True), (True, True, True)), scale, positives, rules)


@pytest.mark.parametrize("penalty", ["in_batch_negatives", "hard_negatives", "all_negatives"])
@pytest.mark.parametrize("strength", [0.5, 9.0])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_penalty_strengths_and_scales(penalty, strength, scale):
    rows, cols, positives, rules = make_case(6, 18, 48, penalty=penalty, strength=strength, seed=4)
    check_pass(rows, cols, SHAPES[48], ((True, True, True), (False, True, True)), scale, positives, rules)


@pytest.mark.parametrize("similarity,scale", [("cos", 1.0), ("cos", 20.0), ("cos", 100.0), ("cos", 500.0),
                                              ("dot", 1.0), ("dot", 0.05)])
@pytest.mark.parametrize("rules_on", [False, True])
def test_scales(similarity, scale, rules_on):
    # 500: no fixed maximum is safe, the running row maximum.
    options = dict(exclusion="groups", penalty="all_negatives", strength=0.5, guided=True, teacher=True) if rules_on \
        else {}
    rows, cols, positives, rules = make_case(4, 12, 100, similarity, seed=2, **options)
    check_pass(rows, cols, SHAPES[100], ((True, True, True), (True, False, True)), scale, positives, rules)


@pytest.mark.parametrize("n_rows", [1, 3, 37])
@pytest.mark.parametrize("cols_per_row", [1, 3])
@pytest.mark.parametrize("n_features", [48, 100])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_shapes_and_chunks(monkeypatch, n_rows, cols_per_row, n_features, similarity):
    # Small chunks of rows (about 8): the masks, guide products and teacher tiles are per chunk.
    n_cols = cols_per_row * n_rows
    monkeypatch.setattr(backend, "CHUNK_ELEMENTS", 8 * n_cols * (3 + 4 + 6))
    exclusion = "self" if cols_per_row == 1 else "groups"
    rows, cols, positives, rules = make_case(n_rows, n_cols, n_features, similarity, exclusion, "in_batch_negatives",
                                             0.5, guided=n_rows > 1, teacher=True, n_layers=3, seed=n_rows)
    scale = 20.0 if similarity == "cos" else 0.05
    check_pass(rows, cols, SHAPES[n_features], ((True, True, False), (False, False, False), (True, True, True)),
               scale, positives, rules)


def test_a_row_with_every_column_excluded_has_log_sum_minus_inf_and_no_nan():
    # R = 1 against its own column only: nothing left in the softmax.
    rows, cols, positives, rules = make_case(1, 1, 48, "dot", "self", teacher=True, seed=9)
    offset, log_sum, positive, teacher_sum = backend.row_statistics(rows, cols, SHAPES[48], ((True,) * 3,) * 2, 1.0,
                                                                    positives, rules)
    assert torch.isneginf(log_sum).all() and torch.isfinite(offset).all()
    assert (positive == 0).all() and (teacher_sum == 0).all()
    check_pass(rows, cols, SHAPES[48], ((True,) * 3,) * 2, 1.0, positives, rules)


@pytest.mark.parametrize("rules", [PLAIN, Rules(similarity="dot")], ids=["plain", "dot"])
def test_float32_inputs_at_float32_tolerance(rules):
    rows, cols, positives, _ = make_case(9, 27, 100, dtype=torch.float32, seed=6)
    check_pass(rows, cols, SHAPES[100], ((True, True, True),) * 2, 20.0 if rules.similarity == "cos" else 0.05,
               positives, rules, tolerance_dtype=torch.float32)


@pytest.mark.parametrize("change,message", [
    (dict(similarity="cosine"), "rules.similarity"),
    (dict(penalty="hard"), "rules.penalty"),
    (dict(exclude_own_group=True, group_period=0), "rules.group_period"),
    (dict(exclude_own_group=True, group_period=3, row_group=None), "rules.row_group"),
    (dict(guide_rows=torch.zeros(4, 3), guide_cols=torch.zeros(5, 3), guide_threshold=None), "rules.guide_threshold"),
    (dict(guide_rows=torch.zeros(4, 3), guide_cols=torch.zeros(4, 3), guide_threshold=torch.zeros(4)),
     "rules.guide_rows"),
])
def test_bad_rules_raise_naming_the_field(change, message):
    rows, cols = make_inputs(1, 4, 5, 8, requires_grad=False)
    rules = Rules(**change)
    with pytest.raises(ValueError, match=message):
        backend.row_statistics(rows, cols, (8,), ((True,),), 20.0, torch.arange(4), rules)


def test_teacher_needs_its_pair_active_and_rules_must_be_rules():
    rows, cols = make_inputs(2, 4, 5, 8, requires_grad=False)
    with pytest.raises(ValueError, match="teacher pair"):
        backend.row_statistics(rows, cols, (4, 8), ((True, True), (True, False)), 20.0, torch.arange(4),
                               Rules(teacher=True))
    with pytest.raises(TypeError, match="rules"):
        backend.row_statistics(rows, cols, (4, 8), ((True, True),) * 2, 20.0, torch.arange(4), "cos")


# Shared tiles (rules.triangle, rules.column_statistics): the joint directions' passes.
# mode -> (triangle, n_cols(R), K(R, C)): R = C (query_to_query), C = 2R + 5 (doc_to_doc's D+ vs D_all layout).
SHARED_ACTIVE = ((True, False, True), (True, True, True))


def make_shared_case(mode, n_rows, similarity="cos", variant=None, strength=0.5, seed=0, dtype=torch.float64):
    """Rows, columns, positives and rules of a shared-tile pass. With the triangle the rows ARE cols[:R];
    ``variant``: None, "own" (exclude_own_group, G = R) or a penalty class (strength ``strength``). Positives:
    with the triangle some j > i, row 1 none (-1) and row 3 one at j < i (excluded: no positive term); else
    row i's own column i ((i + 1) % R with the exclusion), row 1 none."""
    triangle, n_cols_of, k_of = SHARED_PASS_MODES[mode]
    n_cols = n_cols_of(n_rows)
    rows, cols = make_inputs(2, n_rows, n_cols, 48, seed=seed, requires_grad=False)
    if triangle:
        rows = cols[:, :n_rows].clone()
        index = torch.arange(n_rows)
        positives = torch.where(index + 1 + index % 3 < n_cols, index + 1 + index % 3, -1)
        if n_rows > 3:
            positives[3] = 2
    else:
        positives = (torch.arange(n_rows) + (variant == "own")) % n_rows
    positives[1] = -1
    penalty = variant if variant not in (None, "own") else None
    rules = Rules(similarity=similarity, group_period=n_rows, row_group=torch.arange(n_rows),
                  exclude_own_group=variant == "own", penalty=penalty, penalty_strength=strength if penalty else 0.0,
                  triangle=triangle, column_statistics=k_of(n_rows, n_cols))
    return rows.to(dtype), cols.to(dtype), positives, rules


def check_shared_pass(rows, cols, dims, active, scale, positives, rules, seed=0, tolerance_dtype=torch.float64):
    """row_statistics (rows and columns) and pass_gradients (with the reference's statistics) against the
    reference pass; the log-sum-exps (offsets may differ), -inf exactly where everything is excluded."""
    n_layers, n_dims = len(active), len(dims)
    rows64, cols64 = rows.double(), cols.double()
    expected = reference.row_statistics(rows64, cols64, dims, active, scale, positives, rules)
    got = backend.row_statistics(rows, cols, dims, active, scale, positives, rules)
    n_stat = rules.column_statistics
    assert len(got) == len(expected) == (5 if n_stat else 3)
    on = torch.tensor(active)[:, None, :]
    pairs = [("row", got[0], got[1], expected[0] + expected[1], on.expand(n_layers, rows.shape[1], n_dims))]
    if n_stat:
        assert got[3].shape == got[4].shape == (n_layers, n_stat, n_dims)
        pairs.append(("column", got[3], got[4], expected[3] + expected[4], on.expand(n_layers, n_stat, n_dims)))
    for name, offset, log_sum, expected_lse, kept in pairs:
        assert torch.isfinite(offset).all(), f"{name} offset must be finite"
        assert torch.isfinite(log_sum[~kept]).all(), f"{name}: inactive pairs must be finite"
        lse, expected_lse = (offset + log_sum)[kept], expected_lse[kept]
        empty = torch.isneginf(expected_lse)
        assert torch.equal(torch.isneginf(lse), empty), f"{name} log_sum -inf exactly where everything is excluded"
        assert_close(lse[~empty], expected_lse[~empty], tolerance_dtype, f"{name} log-sum-exp")
    if n_stat:
        empty_columns = torch.isneginf(got[4])
        assert (got[3][empty_columns] == 0).all(), "an empty column has offset 0"
    assert_close(got[2], expected[2], tolerance_dtype, "positive logit")

    coef = torch.rand(n_layers, n_dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    coef[0, 0] = 0.0  # a zero weight
    col_stats = dict(col_offset=expected[3], col_log_sum=expected[4]) if n_stat else {}
    expected_grads = reference.pass_gradients(rows64, cols64, dims, active, scale, positives, expected[0],
                                              expected[1], coef, rules, **col_stats)
    acc = backend.accumulator_dtype(rows.dtype)
    got_grads = backend.pass_gradients(rows, cols, dims, active, scale, positives, expected[0].to(acc),
                                       expected[1].to(acc), coef.to(acc), rules,
                                       **{name: value.to(acc) for name, value in col_stats.items()})
    for name, g, e in zip(("d rows", "d cols"), got_grads, expected_grads):
        assert g.dtype == acc and g.shape == e.shape
        assert torch.isfinite(g).all(), f"{name}: not finite"
        # Relative to the largest entry: the gradients grow with the scale (1e4), their rounding with them.
        largest = e.abs().max().clamp_min(1.0)
        assert_close(g / largest, e / largest, tolerance_dtype, name)


SHARED_GRID = [(mode, similarity, variant, n_rows)
               for mode in SHARED_PASS_MODES for similarity in ("cos", "dot")
               for variant in ((None, "own") if SHARED_PASS_MODES[mode][0] else (None, "own", "in_batch_negatives"))
               for n_rows in (37, 130)]


@pytest.mark.parametrize("mode,similarity,variant,n_rows", SHARED_GRID)
def test_shared_tiles_grid_matches_reference(monkeypatch, mode, similarity, variant, n_rows):
    # Triangle chunks of 16 rows (2 and 8 chunks; the last one takes the rest, 21 and 18 rows): a diagonal
    # block per chunk.
    monkeypatch.setattr(backend, "MIN_TRIANGLE_CHUNK", 16)
    monkeypatch.setattr(backend, "TRIANGLE_CHUNKS", 16)
    rows, cols, positives, rules = make_shared_case(mode, n_rows, similarity, variant, seed=n_rows)
    check_shared_pass(rows, cols, SHAPES[48], SHARED_ACTIVE, 20.0 if similarity == "cos" else 1.0, positives, rules)


@pytest.mark.parametrize("n_rows,n_cols", [(1024, 1536), (4096, 6144), (37, 37), (300, 300)])
def test_triangle_chunks_sized_by_the_columns_they_score(n_rows, n_cols):
    # A chunk from row r scores C - r - 1 columns: its working sets stay within CHUNK_ELEMENTS, later chunks take
    # at least as many rows, and the chunks cover the rows in order.
    n_dims = 5
    rules = Rules(triangle=True, column_statistics=n_rows, exclude_own_group=True, group_period=n_rows,
                  row_group=torch.zeros(n_rows, dtype=torch.long))
    starts = backend._pass_chunk(rules, n_rows, n_cols, n_dims)
    chunks = backend._row_chunks(n_rows, starts)
    assert chunks[0].start == 0 and chunks[-1].stop == n_rows
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    sizes = [c.stop - c.start for c in chunks]
    per_row = n_dims + 4 + backend._extra_working_sets(rules)
    for chunk, size in zip(chunks, sizes):
        assert size >= 1
        assert size * max(1, n_cols - chunk.start - 1) * per_row <= max(backend.CHUNK_ELEMENTS, per_row * n_cols), chunk
    assert sizes[:-1] == sorted(sizes[:-1]), sizes
    full_width = backend._chunk_rows(n_rows, n_cols, n_dims, backend._extra_working_sets(rules))
    if full_width < min(n_rows, backend.MIN_TRIANGLE_CHUNK):  # memory-bound: narrower later chunks take more rows
        assert len(chunks) < -(-n_rows // full_width), (sizes, full_width)


@pytest.mark.parametrize("similarity,scale", [("cos", 1.0), ("cos", 20.0), ("cos", 1e4), ("dot", 1.0), ("dot", 0.05)])
@pytest.mark.parametrize("mode,variant", [("both", "own"), ("both-square", None), ("columns", "own"),
                                          ("columns", "hard_negatives"), ("columns-all", "all_negatives")])
def test_shared_tiles_scales(mode, variant, similarity, scale):
    # 1e4: no fixed maximum is safe (running maxima of rows and columns); 1 and 20: the fixed maximum.
    rows, cols, positives, rules = make_shared_case(mode, 37, similarity, variant, strength=9.0, seed=5)
    check_shared_pass(rows, cols, SHAPES[48], SHARED_ACTIVE, scale, positives, rules)


@pytest.mark.parametrize("mode", ["both-square", "both", "columns"])
@pytest.mark.parametrize("chunk_rows", [1, 7])
def test_shared_tiles_small_chunks(monkeypatch, mode, chunk_rows):
    # Many chunks: every column's statistics merge over chunks, some of which skip or exclude all of it.
    monkeypatch.setattr(backend, "CHUNK_ELEMENTS", chunk_rows * 77 * (3 + 4 + 3))
    monkeypatch.setattr(backend, "MIN_TRIANGLE_CHUNK", 1)
    rows, cols, positives, rules = make_shared_case(mode, 36, "dot", "own", seed=3)
    check_shared_pass(rows, cols, SHAPES[48], ((True, True, False), (False, False, False), (True, True, True))[:2],
                      0.05, positives, rules)


@pytest.mark.parametrize("mode", ["both-square", "both", "columns-all"])
def test_shared_tiles_float32_inputs_at_float32_tolerance(mode):
    rows, cols, positives, rules = make_shared_case(mode, 130, "cos", "own" if mode != "both-square" else None,
                                                    seed=8, dtype=torch.float32)
    check_shared_pass(rows, cols, SHAPES[48], SHARED_ACTIVE, 20.0, positives, rules, tolerance_dtype=torch.float32)


@pytest.mark.parametrize("n_rows,n_cols", [(37, 37), (37, 79)])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_triangle_rows_combined_with_columns_equal_the_pass_without_the_row_itself(n_rows, n_cols, similarity):
    # The composition identity: row i over its other rows (and the columns j >= R) is row_stat_i (+) col_stat_i
    # of one triangle pass; its gradient, with the combined statistics, that of the plain pass with the row's
    # own column excluded (the rows being cols[:R], their gradient adds to cols[:R]'s).
    dims, active, scale = SHAPES[48], SHARED_ACTIVE, 20.0 if similarity == "cos" else 1.0
    _, cols = make_inputs(2, n_rows, n_cols, 48, seed=11, requires_grad=False)
    rows, positives = cols[:, :n_rows].clone(), torch.full((n_rows,), -1)
    triangle = Rules(similarity=similarity, triangle=True, column_statistics=n_rows)
    self_excluded = Rules(similarity=similarity, group_period=n_cols, row_group=torch.arange(n_rows),
                          exclude_own_group=True)
    offset, log_sum, _, col_offset, col_log_sum = backend.row_statistics(rows, cols, dims, active, scale, positives,
                                                                         triangle)
    combined = torch.logaddexp(offset + log_sum, col_offset + col_log_sum)
    expected = reference.row_statistics(rows, cols, dims, active, scale, positives, self_excluded)
    on = torch.tensor(active)[:, None, :].expand_as(combined)
    assert_close(combined[on], (expected[0] + expected[1])[on], torch.float64, "combined log-sum-exp")

    coef = torch.rand(2, len(dims), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zeros = torch.zeros_like(combined)
    d_rows, d_cols = backend.pass_gradients(rows, cols, dims, active, scale, positives, zeros, combined, coef,
                                            triangle, col_offset=zeros, col_log_sum=combined)
    e_rows, e_cols = reference.pass_gradients(rows, cols, dims, active, scale, positives, expected[0], expected[1],
                                              coef, self_excluded)
    d_cols[:, :n_rows] += d_rows
    e_cols[:, :n_rows] += e_rows
    assert_close(d_cols, e_cols, torch.float64, "combined gradient")


def _count_products(monkeypatch):
    """Patches the products of the pass (addmm_ for the similarities, @ for the backward's) to add up their
    multiply-adds; returns the running total (a one-element list)."""
    total = [0]
    addmm, matmul = torch.Tensor.addmm_, torch.Tensor.__matmul__

    def counting_addmm(self, a, b, *args, **kwargs):
        total[0] += a.shape[0] * a.shape[1] * b.shape[1]
        return addmm(self, a, b, *args, **kwargs)

    def counting_matmul(self, other):
        if self.dim() == 2 and other.dim() == 2:
            total[0] += self.shape[0] * self.shape[1] * other.shape[1]
        return matmul(self, other)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm)
    monkeypatch.setattr(torch.Tensor, "__matmul__", counting_matmul)
    return total


@pytest.mark.parametrize("with_columns", [False, True])
def test_triangle_skips_the_columns_below_each_chunk(monkeypatch, with_columns):
    # R = C = 128 in chunks of 16 rows: chunk c scores only the columns j > 16 c, so the products of the pass
    # (forward and backward) are exactly sum_c 16 * (127 - 16 c) / (8 * 16 * 128) = 0.555 of the plain pass's.
    monkeypatch.setattr(backend, "MIN_TRIANGLE_CHUNK", 16)
    monkeypatch.setattr(backend, "TRIANGLE_CHUNKS", 8)
    dims, active, n = SHAPES[48], ((True, True, True),) * 2, 128
    _, cols = make_inputs(2, n, n, 48, seed=2, requires_grad=False)
    rows, positives = cols.clone(), torch.full((n,), -1)
    products = _count_products(monkeypatch)
    work = {}
    for name, rules in (("plain", PLAIN), ("triangle", Rules(triangle=True, column_statistics=n if with_columns
                                                              else 0))):
        products[0] = 0
        stats = backend.row_statistics(rows, cols, dims, active, 20.0, positives, rules)
        forward = products[0]
        col_stats = dict(col_offset=stats[3], col_log_sum=stats[4]) if rules.column_statistics else {}
        backend.pass_gradients(rows, cols, dims, active, 20.0, positives, stats[0], stats[1],
                               torch.ones(2, len(dims), dtype=torch.float64), rules, **col_stats)
        work[name] = (forward, products[0] - forward)
    kept_fraction = sum(16 * (n - 1 - 16 * c) for c in range(8)) / (n * n)
    assert work["plain"][0] == 2 * n * n * 48  # one product over D per layer
    for plain, triangle in zip(work["plain"], work["triangle"]):
        assert triangle == pytest.approx(kept_fraction * plain, rel=1e-12)


def test_column_statistics_need_the_column_statistics_in_pass_gradients():
    rows, cols, positives, rules = make_shared_case("columns", 5)
    stats = backend.row_statistics(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives, rules)
    with pytest.raises(ValueError, match="col_offset and col_log_sum"):
        backend.pass_gradients(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives, stats[0], stats[1],
                               torch.ones(2, 2, dtype=torch.float64), rules)
    with pytest.raises(ValueError, match="col_offset and col_log_sum must have shape"):
        backend.pass_gradients(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives, stats[0], stats[1],
                               torch.ones(2, 2, dtype=torch.float64), rules, col_offset=stats[3][:, :2],
                               col_log_sum=stats[4][:, :2])
    with pytest.raises(ValueError, match="rules.column_statistics"):
        backend.row_statistics(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives,
                               replace(rules, column_statistics=cols.shape[1] + 1))
    with pytest.raises(ValueError, match="rules.triangle"):
        backend.row_statistics(cols, rows, (5, 48), ((True, True),) * 2, 20.0, torch.full((cols.shape[1],), -1),
                               replace(rules, triangle=True, column_statistics=0))


def test_backend_declares_shared_tiles():
    assert backend.SHARED_TILES is True
