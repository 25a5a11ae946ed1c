"""Backend ``torch``: the prefix trick in plain PyTorch, chunked over rows; one pass of the contract.

Math (docs/design.md, "The prefix trick" and "The backward pass"). For layer l and nested dim d_m, with
segments ``seg_m = [d_{m-1}, d_m)``::

    S_m      = S_{m-1} + Q[:, seg_m] K[:, seg_m]^T          one accumulator over D
    cos_m    = diag(rq_m) S_m diag(rk_m)                     rq_m = 1 / max(|q[:d_m]|, eps)

Backward, with ``G_m = dLoss/dcos_m`` and suffix sums over dims ``m >= s``::

    dQ[:, seg_s] = H_s K[:, seg_s] - alpha_s * Q[:, seg_s]     H_s = sum_{m>=s} diag(rq_m) G_m diag(rk_m)
    dK[:, seg_s] = H_s^T Q[:, seg_s] - beta_s * K[:, seg_s]    alpha_s = sum_{m>=s} rq_m^2 rowsum(G_m * cos_m)

The pass (``row_statistics`` / ``pass_gradients``, backends/base.py) processes the rows in chunks and
recomputes the similarities in backward, so the extra memory is ``O(chunk * C * M)``, never
``O(L * M * R * C)``. Runs on any device. The rules of m2d_kernels/rules.py are Python branches, so the
plain pass pays nothing for them: "dot" takes inverse norms of one and drops the norm terms; each chunk of
rows gets, once for every (layer, dim) pair, its penalty factors (the logit scale per column, the penalty
being stop-grad: the gradient keeps ``scale``), an additive -inf bias on the excluded columns
(rules.column_masks on the chunk, guide similarities one ``[chunk, Dg] x [Dg, C]`` product) and, for
distillation, the teacher pair's tile (one extra product over D per chunk). The loops are chunk-major
(every layer of a chunk, then the next chunk) so that these are shared by the layers.
Shared tiles: with ``rules.triangle`` a chunk of rows ``[r0, r1)`` is scored against ``cols[r0 + 1:]`` only
(the skipped columns are the speed-up); with ``rules.column_statistics`` each chunk also yields partial
statistics of the first K columns over its rows, merged over the chunks in order (with a fixed maximum the
rows' exponentials serve them: plain sums), and the backward adds the columns' probabilities to the tile.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from m2d_kernels.backends.base import PassGradients, PassStatistics, Softmax, check_columns
from m2d_kernels.numerics import accumulator_dtype, device_table, fixed_max_is_exact, prefix_norms, segments
from m2d_kernels.rules import PLAIN, Rules, check_rules, column_masks

# Elements of one [chunk, N] working set; the backward keeps about (M + 4) of them.
CHUNK_ELEMENTS = 1 << 22
# A triangle pass (rules.triangle) splits its rows into up to this many chunks, of at least this many rows
# (and at most what the chunk's width allows, _pass_chunk): more chunks skip more of the square, but every
# chunk costs each (layer, dim) pair ~50 small ops, whose fixed cost dominates below ~256 rows on a 2-core CPU.
TRIANGLE_CHUNKS = 8
MIN_TRIANGLE_CHUNK = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device) -> str | None:
    return None


def shares_tiles(similarity: str, scale: float | None = None) -> bool:
    """The pass applies rules.triangle and rules.column_statistics for every similarity and scale."""
    return True


def _prefix_tables(x: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype, similarity: str, given=None):
    """``prefix_norms`` for "cos"; for "dot" (no normalisation) ones and None (no norm term)."""
    if similarity == "dot":
        return x.new_ones(x.shape[0], x.shape[1], len(dims), dtype=dtype), None
    return prefix_norms(x, dims, dtype, given)


def _guide_dtype(rules: Rules, acc: torch.dtype) -> torch.dtype:
    """The guide similarities' dtype: the accumulator's, or the guide's if finer (fp64 guide, fp32 rows)."""
    return torch.promote_types(torch.promote_types(rules.guide_rows.dtype, rules.guide_cols.dtype), acc)


def _fixed_max(rules: Rules, scale: float, acc: torch.dtype) -> float | None:
    """The fixed maximum of every logit when it is exact in ``acc`` (numerics.fixed_max_is_exact), else None."""
    max_logit = rules.max_logit(scale)
    return max_logit if max_logit is not None and fixed_max_is_exact(max_logit, acc) else None


def _chunk_rows(n_queries: int, n_docs: int, n_dims: int, n_extra: int = 0) -> int:
    """Rows per chunk: the backward keeps about ``M + 4`` ``[chunk, N]`` working sets, the rules ``n_extra``."""
    return max(1, min(n_queries, CHUNK_ELEMENTS // (n_docs * (n_dims + 4 + n_extra))))


def _last_active(layer_active: tuple[bool, ...]) -> int | None:
    """The largest active dim index of a layer, None when none (no max(default=): torch.compile traces this)."""
    on = [m for m, active in enumerate(layer_active) if active]
    return on[-1] if on else None


def _extra_working_sets(rules: Rules) -> int:
    """``[chunk, C]`` tensors the rules keep beside the plain pass's: the exclusion bias, the penalty
    factors, the guide similarities while the masks are built, the teacher tile and its weights, the
    column softmaxes' probabilities."""
    return (int(rules.exclude_own_group or rules.guided or rules.triangle) + int(rules.penalty is not None)
            + int(rules.guided) + 2 * int(rules.teacher) + int(rules.column_statistics > 0))


class _Tile(NamedTuple):
    """The rules of one chunk of rows, shared by every (layer, dim) pair, over the chunk's columns
    ``cols[start:]`` (``start`` > 0 only with the triangle: every earlier column is excluded for the chunk):
    ``bias`` ``[c, w]``, -inf where excluded and 0 elsewhere, on the first ``w`` of those columns (None:
    nothing excluded; an add is several times faster than masked_fill_; with only the triangle ``w`` is the
    diagonal block), ``keep`` the same columns' 1 / 0 (kept / excluded: with a fixed maximum the exponentials
    are taken unmasked, then multiplied by it, since exp(-inf) takes a slow path on the CPU) and ``factor``
    ``[c, C - start]``, the logit scale of each column (``scale``, or ``scale + penalty_strength`` where
    penalised; None: no penalty, ``scale`` is in the row factors)."""

    start: int
    bias: torch.Tensor | None
    keep: torch.Tensor | None
    factor: torch.Tensor | None


def _column_start(rules: Rules, rows: slice, n_cols: int) -> int:
    """The chunk's first scored column: with the triangle, row ``i`` scores only ``j > i``, so the chunk's
    rows ``[r0, r1)`` none of ``[0, r0 + 1)`` (skipped: no product, no exponential)."""
    return min(rows.start + 1, n_cols) if rules.triangle else 0


def _chunk_tile(rules: Rules, rows: slice, positives: torch.Tensor, n_cols: int, scale: float,
                guide_cols: torch.Tensor | None, acc: torch.dtype) -> _Tile | None:
    """The chunk's masks (None for rules that need none): rules.column_masks on the chunk's rows, restricted
    to its columns (``_column_start``), the guide similarities one ``[c, Dg] x [Dg, C]`` product."""
    if not (rules.exclude_own_group or rules.guided or rules.penalty is not None or rules.triangle):
        return None
    start = _column_start(rules, rows, n_cols)
    guide = None
    if rules.guided:
        guide = rules.guide_rows[rows].to(guide_cols.dtype) @ guide_cols.T
    row_group = None if rules.row_group is None else rules.row_group[rows]
    exclude_own_group = rules.exclude_own_group
    if exclude_own_group and row_group.device.type == "cpu" and not bool((row_group >= 0).any()):
        # No row of the chunk owns a column (group -1: the merged joint pass's queries), so nothing but the
        # triangle is excluded: no mask over the chunk's full width. Read on the CPU only (no device sync).
        exclude_own_group = False
    chunk_rules = replace(
        rules,
        exclude_own_group=exclude_own_group,
        row_group=row_group,
        guide_rows=None if guide is None else rules.guide_rows[rows],
        guide_threshold=None if guide is None else rules.guide_threshold[rows],
    )
    excluded, penalised = column_masks(chunk_rules, n_cols, positives[rows], guide, row_start=rows.start)
    bias = keep = None
    if excluded is not None:
        # The triangle alone excludes only j <= i < r1 among the chunk's columns: the diagonal block.
        width = n_cols - start if exclude_own_group or rules.guided else max(0, rows.stop - start)
        excluded = excluded[:, start:start + width]
        bias = torch.zeros(excluded.shape, dtype=acc, device=excluded.device).masked_fill_(excluded, -torch.inf)
        keep = excluded.logical_not().to(acc)
    factor = None if penalised is None else penalised[:, start:].to(acc).mul_(rules.penalty_strength).add_(scale)
    return _Tile(start, bias, keep, factor)


def _logits(sim, rq_scaled, rk, tile, teacher_weight=None, exclude=True):
    """``z = rq_scaled_i * rk_j * S_ij`` (times the chunk's penalty factors; ``rk`` None: dot similarity)
    with the excluded columns -inf (``exclude``; else unmasked: see ``_exponentials_kept``), and with
    ``teacher_weight`` also ``sum_j teacher_weight_ij * z_ij``, taken before the mask (an excluded column has
    weight 0 and a finite logit there: no 0 * inf)."""
    logits = sim * rq_scaled[:, None]
    if rk is not None:
        logits.mul_(rk[None, :])
    weighted = None
    if tile is not None and tile.factor is not None:
        logits.mul_(tile.factor)
    if teacher_weight is not None:
        weighted = torch.linalg.vecdot(teacher_weight, logits)
    if exclude:
        _exclude(logits, tile)
    return logits, weighted


def _exponentials_kept(logits, fixed_max, tile):
    """``exp(z - fixed_max)`` of unmasked logits, in place, times the tile's keep mask: 0 where excluded."""
    exps = logits.sub_(fixed_max).exp_()
    if tile is not None and tile.keep is not None:
        width = min(tile.keep.shape[1], exps.shape[1])
        exps[:, :width].mul_(tile.keep[:, :width])
    return exps


def _exclude(logits, tile):
    """Adds the tile's -inf bias to the leading columns of ``logits`` it covers (in place)."""
    if tile is not None and tile.bias is not None:
        width = min(tile.bias.shape[1], logits.shape[1])
        logits[:, :width].add_(tile.bias[:, :width])
    return logits


def _column_logits(sim, scale_rq, rk, tile, exclude=True):
    """The column softmaxes' logits ``scale * s`` of some columns (``sim``, ``rk`` the leading columns of the
    chunk's, or gathered ones with ``tile`` None): no penalty, the chunk's exclusions. The same operations
    in the same order in forward and backward: bit-identical. ``exclude`` False: unmasked."""
    logits = sim * scale_rq[:, None]
    if rk is not None:
        logits.mul_(rk[None, :])
    return _exclude(logits, tile) if exclude else logits


def _column_probs(sim, scale_rq, rk, tile, col_offset, col_log_sum):
    """``exp(z_col - col_offset - col_log_sum)`` (``_column_logits``; 0 where excluded), in place."""
    probs = _column_logits(sim, scale_rq, rk, tile).sub_(col_offset[None, :])
    return probs.sub_(col_log_sum[None, :]).exp_()


def _teacher_logits(q, k, segments, rq_scaled, rk, tile):
    """Logits of the teacher pair (last layer, largest dim) for one chunk of rows: the same operations in
    the same order as that pair's in the pass loops, so bit-identical to them (same row maximum)."""
    sim = q.new_zeros(q.shape[0], k.shape[0])
    for a, b in segments:
        sim.addmm_(q[:, a:b], k[:, a:b].T)
    return _logits(sim, rq_scaled, rk, tile)[0]


def _statistics(rows_in, cols_in, dims, active, scale, positives, rules, inv_rows, inv_cols, chunk) -> PassStatistics:
    """The forward loop of a pass (``row_statistics``). ``inv_cols`` None: dot similarity (``inv_rows`` then
    ones). ``positives`` may hold -1 (positive in another block): the guide then exempts no column of that row.
    Chunk-major, so that a chunk's masks and teacher tile serve every layer."""
    acc = inv_rows.dtype
    n_layers, n_rows, _ = rows_in.shape
    n_cols = cols_in.shape[1]
    n_dims = len(dims)
    segs = segments(dims)
    fixed_max = _fixed_max(rules, scale, acc)
    # With a penalty the chunk's factor matrix carries the scale.
    inv_rows_scaled = inv_rows * (scale if rules.penalty is None else 1.0)
    may_be_empty = rules.exclude_own_group or rules.guided or rules.triangle
    guide_cols = None if not rules.guided else rules.guide_cols.to(_guide_dtype(rules, acc))
    positive_index = positives.clamp_min(0)
    slope = rules.scale_slope
    # Per-row softmax statistics, the only ones backward needs, kept relative to the row's maximum (offset)
    # so that no number of magnitude `scale` is ever rounded into them.
    row_offset = rows_in.new_full((n_layers, n_rows, n_dims), 0.0 if fixed_max is None else fixed_max, dtype=acc)
    row_log_sum = torch.zeros_like(row_offset)
    row_positive = torch.zeros_like(row_log_sum)
    row_expected = torch.zeros_like(row_log_sum) if slope else None
    teacher_sum = torch.zeros_like(row_log_sum) if rules.teacher else None
    lasts = [_last_active(layer_active) for layer_active in active]
    # Column statistics (offset, sum exp, sum exp * z), merged over the chunks of rows in chunk order.
    n_stat_cols = rules.column_statistics
    col_stats = None
    if n_stat_cols:
        col_offset = rows_in.new_zeros(n_layers, n_stat_cols, n_dims, dtype=acc)
        col_stats = (col_offset, torch.zeros_like(col_offset), torch.zeros_like(col_offset) if slope else None)

    for rows in _row_chunks(n_rows, chunk):
        start = _column_start(rules, rows, n_cols)
        if start == n_cols:  # triangle, R = C: the last row scores no column (inactive pairs stay finite)
            for layer, layer_active in enumerate(active):
                for m, on in enumerate(layer_active):
                    if on:
                        row_log_sum[layer, rows, m] = -torch.inf
            continue
        tile = _chunk_tile(rules, rows, positives, n_cols, scale, guide_cols, acc)
        n_stat = max(0, n_stat_cols - start)  # the chunk's columns among the first K
        local_positives = positive_index[rows] - start
        positive_bias = None
        if start or (tile is not None and tile.bias is not None):
            # The positive's -inf where it is excluded (before the chunk's columns with the triangle, or in the
            # bias): the unmasked logits (fixed maximum) do not carry it.
            positive_bias = torch.where(local_positives >= 0, 0.0, -torch.inf).to(acc)
            if tile is not None and tile.bias is not None and tile.bias.shape[1] > 0:  # B = 1: the triangle's is empty
                in_bias = local_positives.clamp(0, tile.bias.shape[1] - 1)[:, None]
                positive_bias += torch.where(local_positives < tile.bias.shape[1],
                                             tile.bias.gather(1, in_bias)[:, 0], 0.0)
            local_positives = local_positives.clamp_min(0)
        teacher_weight = None
        if rules.teacher:
            teacher = _teacher_logits(rows_in[-1, rows].to(acc), cols_in[-1, start:].to(acc), segs,
                                      inv_rows_scaled[-1, rows, -1],
                                      None if inv_cols is None else inv_cols[-1, start:, -1], tile)
            teacher_weight = teacher.sub_(_offset(teacher, fixed_max, may_be_empty)[:, None]).exp_()
        for layer, layer_active in enumerate(active):
            last = lasts[layer]
            if last is None:
                continue
            q = rows_in[layer, rows].to(acc)
            k_all = cols_in[layer, start:].to(acc)  # a copy only for fp16/bf16, one layer at a time
            sim = q.new_zeros(q.shape[0], n_cols - start)
            for m, (a, b) in enumerate(segs[: last + 1]):
                sim.addmm_(q[:, a:b], k_all[:, a:b].T)
                if not layer_active[m]:
                    continue
                rk = None if inv_cols is None else inv_cols[layer, start:, m]
                logits, weighted = _logits(sim, inv_rows_scaled[layer, rows, m], rk, tile, teacher_weight,
                                           exclude=fixed_max is None)
                positive = logits.gather(1, local_positives[:, None])[:, 0]
                if positive_bias is not None:  # -inf where the positive is excluded
                    positive = positive + positive_bias
                if fixed_max is None:
                    offset, exps = _exponentials(logits, 1, None, may_be_empty)
                else:
                    # In place unless the logits serve again (the scale's slope).
                    offset, exps = fixed_max, _exponentials_kept(logits.clone() if slope else logits, fixed_max,
                                                                 tile)
                exp_sum = exps.sum(1)
                if fixed_max is None:  # else row_offset holds it already
                    row_offset[layer, rows, m] = offset
                row_log_sum[layer, rows, m] = exp_sum.log()
                row_positive[layer, rows, m] = positive
                if weighted is not None:
                    teacher_sum[layer, rows, m] = weighted
                if slope:
                    row_expected[layer, rows, m] = torch.linalg.vecdot(exps, logits) / exp_sum
                if n_stat:
                    # The chunk's rows against its columns among the first K: no penalty, the same exclusions.
                    columns = slice(start, start + n_stat)
                    column = logits[:, :n_stat] if rules.penalty is None else _column_logits(
                        sim[:, :n_stat], scale * inv_rows[layer, rows, m], None if rk is None else rk[:n_stat], tile,
                        exclude=fixed_max is None)
                    if fixed_max is not None:
                        # One fixed maximum: plain sums over the chunks, and without a penalty the rows' exponentials.
                        column_exps = exps[:, :n_stat] if rules.penalty is None else _exponentials_kept(
                            column, fixed_max, tile)
                        col_stats[1][layer, columns, m] += column_exps.sum(0)
                        if slope:
                            col_stats[2][layer, columns, m] += (column_exps * column).sum(0)
                    else:
                        _merge_partial_stats(col_stats, layer, m, columns,
                                             _partial_stats(column, 0, fixed_max, slope, may_be_empty))

    row_positive = torch.where((positives >= 0)[None, :, None], row_positive, 0.0)
    columns = None
    if col_stats is not None:
        col_offset, col_exp_sum, col_exp_logit_sum = col_stats
        if fixed_max is not None:  # summed above: offset fixed_max, 0 for an empty column
            col_offset = torch.where(col_exp_sum > 0, col_exp_sum.new_tensor(fixed_max), 0.0)  # not a float32 scalar
        col_log_sum = col_exp_sum.log()
        pair_active = device_table(active, col_log_sum.device)[:, None, :]
        col_log_sum = torch.where(pair_active, col_log_sum, 0.0)  # inactive pairs have finite statistics
        expected = None if col_exp_logit_sum is None else torch.where(pair_active, col_exp_logit_sum / col_exp_sum, 0.0)
        columns = Softmax(col_offset, col_log_sum, expected)
    return PassStatistics(Softmax(row_offset, row_log_sum, row_expected), row_positive, teacher_sum, columns)


def _backward(rows_in, cols_in, dims, active, scale, positives, softmax: Softmax, coef, rules, distill_coef,
              columns: Softmax | None, row_tables, col_tables, chunk):
    """Gradients ``(d_rows, d_cols)`` in the accumulator dtype of ``pass_gradients``' objective, with the given
    statistics. ``row_tables`` / ``col_tables``: the ``(inverse norms, norm factors)`` of ``_prefix_tables``
    (``col_tables`` None: dot similarity). Chunk-major like the forward."""
    inv_q, norm_factor_q = row_tables
    inv_k, norm_factor_k = col_tables if col_tables is not None else (None, None)
    acc = inv_q.dtype
    row_offset, row_log_sum = softmax.offset.to(acc), softmax.log_sum.to(acc)
    col_offset = col_log_sum = None
    if columns is not None:
        col_offset, col_log_sum = columns.offset.to(acc), columns.log_sum.to(acc)
    queries, docs = rows_in, cols_in
    n_layers, n_queries, _ = queries.shape
    n_docs = docs.shape[1]
    segs = segments(dims)
    normalised = inv_k is not None  # dot similarity: no norms, no norm term
    # d loss / d cos per row = coef * scale * (P - onehot).
    coef = coef.to(acc) * scale
    distill = None if distill_coef is None else distill_coef.to(acc) * scale
    inv_q_scaled_factor = scale if rules.penalty is None else 1.0
    guide_cols = None if not rules.guided else rules.guide_cols.to(_guide_dtype(rules, acc))
    fixed_max = _fixed_max(rules, scale, acc) if distill is None else None
    if fixed_max is not None:
        # P = exp(z - fixed_max) * exp(fixed_max - offset - log_sum): one exponential of the tile serves the
        # rows' and the columns' softmaxes. The weights are at most exp(2 * fixed_max) (log_sum covers the
        # row's maximum, at least -fixed_max), 0 for a row or column with every entry excluded.
        row_weight = _softmax_weights(fixed_max, row_offset, row_log_sum)
        col_weight = None if col_log_sum is None else _softmax_weights(fixed_max, col_offset, col_log_sum)
    elif rules.exclude_own_group or rules.guided or rules.triangle:
        # A row (column) whose every entry is excluded has log_sum -inf and all logits -inf: P = 0, not NaN.
        row_log_sum = row_log_sum.nan_to_num(neginf=0.0)
        col_log_sum = None if col_log_sum is None else col_log_sum.nan_to_num(neginf=0.0)
    onehot = (positives >= 0).to(acc)
    positive_index = positives.clamp_min(0)
    grad_q = torch.zeros_like(queries, dtype=acc)
    grad_k = torch.zeros_like(docs, dtype=acc)
    lasts = [_last_active(layer_active) for layer_active in active]
    # beta before the rk^2 factor: colsum(G_m * cos_m) = colsum(H_m * S_m), summed over row chunks.
    gc_colsum = grad_k.new_zeros(n_layers, n_docs, len(dims))

    for rows in _row_chunks(n_queries, chunk):
        r0 = rows.start
        start = _column_start(rules, rows, n_docs)
        if start == n_docs:  # triangle, R = C: the last row scores no column
            continue
        n_rows = rows.stop - rows.start
        n_stat = max(0, rules.column_statistics - start)
        row_ids = torch.arange(n_rows, device=queries.device)
        positive_ids = positive_index[rows] - start
        chunk_onehot = onehot[rows]
        if rules.triangle:
            # A positive at j <= i is excluded: no one-hot term (and none before the chunk's columns).
            kept = positive_index[rows] > row_ids + r0
            chunk_onehot = chunk_onehot * kept
            positive_ids = positive_ids.clamp_min(0)
        if rules.exclude_own_group:
            # A positive in the row's own (excluded) group: z = -inf, no one-hot term (the guide never drops it).
            chunk_onehot = chunk_onehot * (positive_index[rows] % rules.group_period != rules.row_group[rows])
        tile = _chunk_tile(rules, rows, positives, n_docs, scale, guide_cols, acc)
        teacher_probs = None
        if distill is not None:
            teacher = _teacher_logits(queries[-1, rows].to(acc), docs[-1, start:].to(acc), segs,
                                      inv_q[-1, rows, -1] * inv_q_scaled_factor,
                                      inv_k[-1, start:, -1] if normalised else None, tile)
            teacher_probs = teacher.sub_(row_offset[-1, rows, -1, None]).sub_(row_log_sum[-1, rows, -1, None]).exp_()
        for layer, layer_active in enumerate(active):
            last = lasts[layer]
            if last is None:
                continue
            q = queries[layer, rows].to(acc)
            k_all = docs[layer, start:].to(acc)
            sim = q.new_zeros(n_rows, n_docs - start)
            h_terms = {}
            for m, (a, b) in enumerate(segs[: last + 1]):
                # The same operations in the same order as the forward: bit-identical logits.
                sim.addmm_(q[:, a:b], k_all[:, a:b].T)
                if not layer_active[m]:
                    continue
                rq = inv_q[layer, rows, m]
                rk = inv_k[layer, start:, m] if normalised else None
                # grad_cos / coef = P - onehot, with P = exp((z - offset) - log_sum); built in place.
                grad, _ = _logits(sim, inv_q_scaled_factor * rq, rk, tile, exclude=fixed_max is None)
                if fixed_max is not None:
                    _exponentials_kept(grad, fixed_max, tile)
                    if n_stat:  # + the columns' P_col (below); without a penalty the same exponentials
                        columns = slice(start, start + n_stat)
                        column_weight = col_weight[layer, columns, m]
                        if rules.penalty is None:
                            grad[:, :n_stat].mul_(row_weight[layer, rows, m, None] + column_weight[None, :])
                            grad[:, n_stat:].mul_(row_weight[layer, rows, m, None])
                        else:
                            column_exps = _exponentials_kept(_column_logits(
                                sim[:, :n_stat], scale * rq, None if rk is None else rk[:n_stat], tile, exclude=False),
                                fixed_max, tile)
                            grad.mul_(row_weight[layer, rows, m, None])
                            grad[:, :n_stat].addcmul_(column_exps, column_weight[None, :])
                    else:
                        grad.mul_(row_weight[layer, rows, m, None])
                else:
                    grad.sub_(row_offset[layer, rows, m, None])
                    grad.sub_(row_log_sum[layer, rows, m, None]).exp_()
                if teacher_probs is None:
                    grad[row_ids, positive_ids] -= chunk_onehot
                    row_coef = coef[layer, m] * rq
                else:
                    # dz = (coef + distill) P - coef onehot - distill P_T, already times coef.
                    grad.mul_(coef[layer, m] + distill[layer, m]).addcmul_(teacher_probs, -distill[layer, m])
                    grad[row_ids, positive_ids] -= coef[layer, m] * chunk_onehot
                    row_coef = rq
                # The columns' softmaxes: + P_col (d LSE_col / d z_col; z_col has z's gradient, the penalty
                # being stop-grad).
                if n_stat and fixed_max is None:
                    columns = slice(start, start + n_stat)
                    grad[:, :n_stat] += _column_probs(
                        sim[:, :n_stat], scale * rq, None if rk is None else rk[:n_stat], tile,
                        col_offset[layer, columns, m], col_log_sum[layer, columns, m])
                # H = coef * grad * rq * rk; then sum_j H S = rq * sum_j G cos gives alpha, sum_i H S beta.
                h = grad.mul_(row_coef[:, None])
                alpha = None
                if normalised:
                    h.mul_(rk[None, :])
                    h_times_sim = h * sim
                    alpha = norm_factor_q[layer, rows, m] * h_times_sim.sum(1)
                    gc_colsum[layer, start:, m] += h_times_sim.sum(0)
                h_terms[m] = (h, alpha)
            # Walk the segments from the largest dim down, keeping the suffix sums.
            h_suffix, alpha_suffix = None, None
            for m in range(last, -1, -1):
                if m in h_terms:
                    h_m, alpha_m = h_terms.pop(m)
                    h_suffix = h_m if h_suffix is None else h_suffix.add_(h_m)
                    if normalised:
                        alpha_suffix = alpha_m if alpha_suffix is None else alpha_suffix + alpha_m
                a, b = segs[m]
                if normalised:
                    grad_q[layer, rows, a:b] = h_suffix @ k_all[:, a:b] - alpha_suffix[:, None] * q[:, a:b]
                else:
                    grad_q[layer, rows, a:b] = h_suffix @ k_all[:, a:b]
                grad_k[layer, start:, a:b] += h_suffix.T @ q[:, a:b]

    if normalised:
        for layer, last in enumerate(lasts):
            if last is None:
                continue
            beta = (norm_factor_k[layer] * gc_colsum[layer]).flip(-1).cumsum(-1).flip(-1)
            k_all = docs[layer].to(acc)
            for m, (a, b) in enumerate(segs[: last + 1]):
                grad_k[layer, :, a:b] -= beta[:, m, None] * k_all[:, a:b]

    return grad_q, grad_k


def _offset(logits: torch.Tensor, fixed_max: float | None, may_be_empty: bool = False, dim: int = 1):
    """``fixed_max``, or the maximum along ``dim``; 0 where every logit is -inf (``may_be_empty``: exclusion)."""
    if fixed_max is not None:
        return logits.new_full(logits.shape[1 - dim: 2 - dim], fixed_max)
    offset = logits.amax(dim)
    return offset.nan_to_num_(neginf=0.0) if may_be_empty else offset


def _exponentials(logits: torch.Tensor, dim: int, fixed_max: float | None, may_be_empty: bool = False):
    """``(offset, exp(z - offset))`` with the offset of ``_offset`` along ``dim``."""
    offset = _offset(logits, fixed_max, may_be_empty, dim)
    return offset, (logits - offset.unsqueeze(dim) if fixed_max is None else logits - fixed_max).exp_()


def _partial_stats(logits: torch.Tensor, dim: int, fixed_max: float | None, with_logit_sum: bool,
                   may_be_empty: bool = False):
    """Softmax statistics along ``dim`` relative to an offset (``_offset``): ``(offset, sum exp(z - offset),
    sum exp(z - offset) * z)`` (the last None unless ``with_logit_sum``)."""
    offset, exps = _exponentials(logits, dim, fixed_max, may_be_empty)
    exp_logit_sum = (exps * logits).sum(dim) if with_logit_sum else None
    return offset, exps.sum(dim), exp_logit_sum


def _softmax_weights(fixed_max: float, offset: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
    """``exp(fixed_max - offset - log_sum)``, 0 where ``log_sum`` is -inf (every entry excluded)."""
    return torch.where(torch.isneginf(log_sum), 0.0, (fixed_max - offset - log_sum).exp())


def _merge_partial_stats(stats, layer, m, columns, part):
    """Merges one chunk's statistics of some columns over its rows (``part``, ``_partial_stats`` along dim 0)
    into the running ``stats`` ``(offset, sum exp(z - offset), sum exp(z - offset) z or None)`` ``[L, K, M]``
    at ``[layer, columns, m]``, in place; the chunks merge in their fixed order. A zero sum (every entry so
    far excluded) counts as empty whatever its offset: an empty chunk's offset 0 must not stand in for a
    maximum far below it (dot). A column empty over every chunk ends with offset 0 and sum 0."""
    offsets = [torch.where(exp_sum > 0, offset, -torch.inf)
               for offset, exp_sum in ((stats[0][layer, columns, m], stats[1][layer, columns, m]), part[:2])]
    offset = torch.maximum(*offsets).nan_to_num_(neginf=0.0)
    rescale = [(o - offset).exp_() for o in offsets]  # ones with a fixed maximum
    stats[0][layer, columns, m] = offset
    for total, chunk_value in zip(stats[1:], part[1:]):
        if total is not None:
            total[layer, columns, m] = total[layer, columns, m] * rescale[0] + chunk_value * rescale[1]


def _row_chunks(n_rows: int, chunk: int | tuple[int, ...]) -> list[slice]:
    """The chunks of rows, in order: ``chunk`` rows each (an int), or starting at each of ``chunk`` (a tuple)."""
    starts = list(range(0, n_rows, chunk)) if isinstance(chunk, int) else list(chunk)
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n_rows])]


def _pass_chunk(rules: Rules, n_rows: int, n_cols: int, n_dims: int) -> int | tuple[int, ...]:
    """Rows per chunk of a pass (``_row_chunks``). A triangle pass takes up to ``TRIANGLE_CHUNKS`` chunks (of at
    least ``MIN_TRIANGLE_CHUNK`` rows), since it skips, per chunk, only the columns before the chunk's first row
    (with n chunks it computes ``(n + 1) / 2n`` of the square block); a chunk starting at row r scores only
    ``C - r - 1`` columns, so its rows are bounded by that width (later chunks take more rows for the same
    working set), and a last chunk within a quarter of the others' rows joins the one before it."""
    extra = _extra_working_sets(rules)
    chunk = _chunk_rows(n_rows, n_cols, n_dims, extra)
    if not rules.triangle:
        return chunk
    most = max(MIN_TRIANGLE_CHUNK, -(-n_rows // TRIANGLE_CHUNKS))
    starts, r0 = [], 0
    while r0 < n_rows:
        fits = _chunk_rows(n_rows - r0, max(1, n_cols - r0 - 1), n_dims, extra)
        rows = min(fits, most)
        if n_rows - r0 <= min(fits, rows * 5 // 4):
            rows = n_rows - r0
        starts.append(r0)
        r0 += rows
    return tuple(starts)


def row_statistics(rows, cols, dims, active, scale, positives, rules=PLAIN, norms=None) -> PassStatistics:
    """The pass's forward (backends/base.py), in the accumulator dtype."""
    check_rules(rules, rows.shape[1], cols.shape[1], active)
    acc = accumulator_dtype(rows.dtype)
    row_norms, col_norms = norms or (None, None)
    with torch.no_grad():
        inv_rows = _prefix_tables(rows, dims, acc, rules.similarity, row_norms)[0]
        inv_cols = (_prefix_tables(cols, dims, acc, rules.similarity, col_norms)[0] if rules.similarity == "cos"
                    else None)
        return _statistics(rows, cols, dims, active, scale, positives, rules, inv_rows, inv_cols,
                           _pass_chunk(rules, rows.shape[1], cols.shape[1], len(dims)))


def pass_gradients(rows, cols, dims, active, scale, positives, softmax, coef, rules=PLAIN, distill_coef=None,
                   columns=None, norms=None) -> PassGradients:
    """The pass's backward (backends/base.py), in the accumulator dtype: unrounded, so that a caller summing
    the blocks rounds once."""
    check_rules(rules, rows.shape[1], cols.shape[1], active, distill_coef is not None)
    check_columns(rules, columns, len(active), len(dims))
    acc = accumulator_dtype(rows.dtype)
    row_norms, col_norms = norms or (None, None)
    with torch.no_grad():
        # Inputs in the accumulator dtype (a copy only for fp16/bf16).
        rows, cols = rows.to(acc), cols.to(acc)
        row_tables = _prefix_tables(rows, dims, acc, rules.similarity, row_norms)
        col_tables = _prefix_tables(cols, dims, acc, "cos", col_norms) if rules.similarity == "cos" else None
        d_rows, d_cols = _backward(rows, cols, dims, active, scale, positives, softmax, coef, rules, distill_coef,
                                   columns, row_tables, col_tables,
                                   _pass_chunk(rules, rows.shape[1], cols.shape[1], len(dims)))
    return PassGradients(d_rows, d_cols)
