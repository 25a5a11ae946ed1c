"""What is the torch backend's own: its chunks of rows (sizes, the triangle's skipped columns), the composition
identity of a triangle pass and the errors of its pass. Its statistics and gradients under every rule, shape,
scale and dtype against the float64 reference pass are test_passes.py's grid (which also runs it in small chunks).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import SHARED_PASS_MODES, assert_close, make_inputs

from m2d_kernels.backends import reference
from m2d_kernels.backends import torch_prefix as backend
from m2d_kernels.backends.base import Softmax
from m2d_kernels.rules import PLAIN, Rules

SHAPES = {48: (5, 20, 48), 100: (7, 33, 100)}  # D -> nested dims, not multiples of 16


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
    stats = backend.row_statistics(rows, cols, dims, active, scale, positives, triangle)
    combined = torch.logaddexp(stats.rows.offset + stats.rows.log_sum, stats.columns.offset + stats.columns.log_sum)
    expected = reference.row_statistics(rows, cols, dims, active, scale, positives, self_excluded).rows
    on = torch.tensor(active)[:, None, :].expand_as(combined)
    assert_close(combined[on], (expected.offset + expected.log_sum)[on], torch.float64, "combined log-sum-exp")

    coef = torch.rand(2, len(dims), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    merged = Softmax(torch.zeros_like(combined), combined)  # row i's softmax over both its row and its column
    got = backend.pass_gradients(rows, cols, dims, active, scale, positives, merged, coef, triangle, columns=merged)
    want = reference.pass_gradients(rows, cols, dims, active, scale, positives, expected, coef, self_excluded)
    d_rows, d_cols, e_rows, e_cols = got.rows, got.cols.clone(), want.rows, want.cols.clone()
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
        backend.pass_gradients(rows, cols, dims, active, 20.0, positives, stats.rows,
                               torch.ones(2, len(dims), dtype=torch.float64), rules, columns=stats.columns)
        work[name] = (forward, products[0] - forward)
    kept_fraction = sum(16 * (n - 1 - 16 * c) for c in range(8)) / (n * n)
    assert work["plain"][0] == 2 * n * n * 48  # one product over D per layer
    for plain, triangle in zip(work["plain"], work["triangle"]):
        assert triangle == pytest.approx(kept_fraction * plain, rel=1e-12)


def test_column_statistics_need_the_column_statistics_in_pass_gradients():
    rows, cols, positives, rules = make_shared_case("columns", 5)
    stats = backend.row_statistics(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives, rules)
    coef = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="columns .* are required with rules.column_statistics"):
        backend.pass_gradients(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives, stats.rows, coef, rules)
    with pytest.raises(ValueError, match=r"columns.offset must have shape \(2, 5, 2\)"):
        backend.pass_gradients(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives, stats.rows, coef, rules,
                               columns=Softmax(stats.columns.offset[:, :2], stats.columns.log_sum[:, :2]))
    with pytest.raises(ValueError, match="columns .* are given, but rules.column_statistics is 0"):
        backend.pass_gradients(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives, stats.rows, coef,
                               replace(rules, column_statistics=0), columns=stats.columns)
    with pytest.raises(ValueError, match="rules.column_statistics"):
        backend.row_statistics(rows, cols, (5, 48), ((True, True),) * 2, 20.0, positives,
                               replace(rules, column_statistics=cols.shape[1] + 1))
    with pytest.raises(ValueError, match="rules.triangle"):
        backend.row_statistics(cols, rows, (5, 48), ((True, True),) * 2, 20.0, torch.full((cols.shape[1],), -1),
                               replace(rules, triangle=True, column_statistics=0))


def test_backend_shares_tiles_for_every_similarity_and_scale():
    assert all(backend.shares_tiles(similarity, scale) for similarity in ("cos", "dot") for scale in (1.0, 40.5, 1e4))
    assert backend.shares_tiles("cos") and backend.shares_tiles("dot")
