"""The Triton forward kernel: per row block, every (layer, dim) pair's softmax statistics from one
accumulator over ``[0, top)`` with the pair's epilogue at each nested-dim boundary (docs/design.md, "The
prefix trick")."""

from __future__ import annotations

import triton
import triton.language as tl

from m2d_kernels.backends.triton_configs import (
    FORWARD_CONFIGS,
    RULE_FLAGS,
    _autotuned,
)
from m2d_kernels.backends.triton_tiles import (
    _accumulate_chunk,
    _accumulate_layer,
    _accumulate_segment,
    _bound,
    _column,
    _next_segment,
    _pair_logits,
    _segment,
    _tile_rules,
)


@triton.jit
def _forward_epilogue(
    acc, m, run_max, run_sum, run_wsum, pos_logit, t_sum, t_weight, t_rescale, r, c, r_mask, c_mask, keep, penalised,
    is_pos, has_pos, layer, active_ptr, inv_rows_ptr, inv_cols_ptr, R, C, scale_log2, penalty_log2, col_sum_ptr, K,
    stat_cols, M: tl.constexpr, M_PAD: tl.constexpr, FIXED_MAX: tl.constexpr, SCALE_GRAD: tl.constexpr,
    SIMILARITY_DOT: tl.constexpr, EXCLUDES: tl.constexpr, PENALTY_MODE: tl.constexpr, TEACHER: tl.constexpr,
    COLUMN_STATS: tl.constexpr,
):
    """Pair (layer, m) of one tile, S_m = acc, if active: the row statistics' column m (and the column sums)."""
    m_ids = tl.arange(0, M_PAD)
    if tl.load(active_ptr + layer * M + m) != 0:
        z = _pair_logits(acc, layer, m, r, c, r_mask, c_mask, keep, penalised, inv_rows_ptr, inv_cols_ptr, R, C,
                         scale_log2, penalty_log2, M, SIMILARITY_DOT, PENALTY_MODE)
        is_m = m_ids[None, :] == m
        if COLUMN_STATS:
            if stat_cols:
                # The columns' softmaxes: no penalty, the same exclusions (-inf), the fixed maximum scale
                # (cos only). Atomics: the row blocks add to the same columns in no fixed order.
                if PENALTY_MODE == 0:
                    z_col = z
                else:
                    z_col = _pair_logits(acc, layer, m, r, c, r_mask, c_mask, keep, 0, inv_rows_ptr,
                                         inv_cols_ptr, R, C, scale_log2, 0.0, M, SIMILARITY_DOT, 0)
                e_col = tl.where(r_mask[:, None], tl.exp2(z_col - scale_log2), 0.0)
                tl.atomic_add(col_sum_ptr + (layer * K + c) * M + m, tl.sum(e_col, axis=0), mask=c < K,
                              sem="relaxed")
        if has_pos:
            hit = tl.sum(tl.where(is_pos, z, 0.0), axis=1)
            pos_logit = tl.where(is_m, pos_logit + hit[:, None], pos_logit)
        if TEACHER:  # sum_j w_T(j) z_j over the kept columns (w_T is 0 elsewhere, z -inf: no 0 * inf)
            tile_t = tl.sum(t_weight * tl.where(keep, z, 0.0), axis=1)
            t_sum = tl.where(is_m, t_sum * t_rescale[:, None] + tile_t[:, None], t_sum)
        if FIXED_MAX:
            if PENALTY_MODE == 0:
                shifted = z - scale_log2
            else:
                shifted = z - (scale_log2 + penalty_log2)
            e = tl.exp2(shifted)
            run_sum = tl.where(is_m, run_sum + tl.sum(e, axis=1)[:, None], run_sum)
            if SCALE_GRAD:
                tile_wsum = tl.sum(e * tl.where(c_mask[None, :], shifted, 0.0), axis=1)
                run_wsum = tl.where(is_m, run_wsum + tile_wsum[:, None], run_wsum)
        else:
            old_max = _column(run_max, m, m_ids)
            new_max = tl.maximum(old_max, tl.max(z, axis=1))
            # The first tile has old_max = -inf and nothing to rescale (and inf * 0 is NaN).
            delta = tl.where(old_max == float("-inf"), 0.0, old_max - new_max)
            rescale = tl.exp2(delta)
            old_sum = _column(run_sum, m, m_ids)
            if EXCLUDES:  # every column so far excluded: shift by 0, not by -inf (-inf - -inf is NaN)
                shifted = z - tl.where(new_max == float("-inf"), 0.0, new_max)[:, None]
            else:
                shifted = z - new_max[:, None]
            e = tl.exp2(shifted)
            new_sum = old_sum * rescale + tl.sum(e, axis=1)
            if SCALE_GRAD:
                # sum_j e_j (z_j - old) -> sum_j e_j 2^delta (z_j - new) = (. + delta * sum) 2^delta
                new_wsum = (_column(run_wsum, m, m_ids) + delta * old_sum) * rescale
                new_wsum += tl.sum(e * tl.where(c_mask[None, :], shifted, 0.0), axis=1)
                run_wsum = tl.where(is_m, new_wsum[:, None], run_wsum)
            run_max = tl.where(is_m, new_max[:, None], run_max)
            run_sum = tl.where(is_m, new_sum[:, None], run_sum)
    return run_max, run_sum, run_wsum, pos_logit, t_sum


@triton.jit
def _forward_tile(
    run_max, run_sum, run_wsum, pos_logit, t_sum, t_weight, t_rescale,
    x_base, x_offsets, y_base, y_offsets, r, c, r_mask, c_mask, keep, penalised, is_pos, has_pos, layer, n_seg,
    bounds_ptr, active_ptr, inv_rows_ptr, inv_cols_ptr, R, C, scale_log2, penalty_log2, col_sum_ptr, K, stat_cols,
    M: tl.constexpr, M_PAD: tl.constexpr, FIXED_MAX: tl.constexpr, ALIGNED: tl.constexpr,
    SCALE_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    SIMILARITY_DOT: tl.constexpr, EXCLUDES: tl.constexpr, PENALTY_MODE: tl.constexpr, TEACHER: tl.constexpr,
    COLUMN_STATS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One [rows, cols] tile of one layer: one accumulator over [0, top) with the (layer, dim)
    epilogue at every active boundary, updating the per-row statistics [BLOCK_R, M_PAD] and (COLUMN_STATS,
    on a tile with columns j < K: ``stat_cols``) adding the columns' sums of exp2(z_col - scale_log2) to
    col_sum [L, K, M]. ALIGNED: one flat k-loop over [0, top), so the software pipeline keeps loading the next
    chunks while an epilogue runs (a loop per segment drains and refills it at every boundary); otherwise a
    loop per segment, whose last chunk is masked at the boundary."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    if ALIGNED:
        top = _bound(bounds_ptr, n_seg, ALIGNED)
        m = 0
        hi = _bound(bounds_ptr, 1, ALIGNED)
        for k0 in range(0, top, BLOCK_D):
            acc = _accumulate_chunk(acc, x_base, x_offsets, y_base, y_offsets, r_mask, c_mask, k0, hi, ALIGNED,
                                    BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
            if k0 + BLOCK_D == hi:  # S_m is complete: bounds are multiples of BLOCK_D
                run_max, run_sum, wsum, pos_logit, tsum = _forward_epilogue(
                    acc, m, run_max, run_sum, run_wsum, pos_logit, t_sum, t_weight, t_rescale, r, c, r_mask, c_mask,
                    keep, penalised, is_pos, has_pos, layer, active_ptr, inv_rows_ptr, inv_cols_ptr, R, C,
                    scale_log2, penalty_log2, col_sum_ptr, K, stat_cols, M, M_PAD, FIXED_MAX, SCALE_GRAD,
                    SIMILARITY_DOT, EXCLUDES, PENALTY_MODE, TEACHER, COLUMN_STATS)
                if SCALE_GRAD:  # loop-carried values keep their type: the unused ones stay constants
                    run_wsum = wsum
                if TEACHER:
                    t_sum = tsum
                m, hi = _next_segment(bounds_ptr, m, n_seg, ALIGNED)
    else:
        for m in range(0, n_seg):
            lo, hi = _segment(bounds_ptr, m, ALIGNED)
            acc = _accumulate_segment(acc, x_base, x_offsets, y_base, y_offsets, r_mask, c_mask, lo, hi, ALIGNED,
                                      BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
            run_max, run_sum, wsum, pos_logit, tsum = _forward_epilogue(
                acc, m, run_max, run_sum, run_wsum, pos_logit, t_sum, t_weight, t_rescale, r, c, r_mask, c_mask,
                keep, penalised, is_pos, has_pos, layer, active_ptr, inv_rows_ptr, inv_cols_ptr, R, C, scale_log2,
                penalty_log2, col_sum_ptr, K, stat_cols, M, M_PAD, FIXED_MAX, SCALE_GRAD, SIMILARITY_DOT, EXCLUDES,
                PENALTY_MODE, TEACHER, COLUMN_STATS)
            if SCALE_GRAD:  # as above: the unused loop-carried values stay the caller's constants
                run_wsum = wsum
            if TEACHER:
                t_sum = tsum
    return run_max, run_sum, run_wsum, pos_logit, t_sum


@triton.jit
def _initial_statistics(active_ptr, layer, m_ids, FIXED_MAX: tl.constexpr, fixed_max, M: tl.constexpr,
                        BLOCK_R: tl.constexpr, M_PAD: tl.constexpr):
    """(run_max, run_sum) before the first tile. Inactive pairs keep max 0 and sum 1 so that their
    (unused) statistics stay finite."""
    inactive = (tl.load(active_ptr + layer * M + m_ids, mask=m_ids < M, other=0) == 0)[None, :]
    if FIXED_MAX:
        run_max = tl.zeros([BLOCK_R, M_PAD], tl.float32) + fixed_max
    else:
        run_max = tl.where(inactive, 0.0, tl.full([BLOCK_R, M_PAD], float("-inf"), tl.float32))
    return run_max, tl.zeros([BLOCK_R, M_PAD], tl.float32) + inactive.to(tl.float32)


def _m2d_fwd_kernel(
    rows_ptr,          # [L, R, D] bf16/fp16/fp32, rows contiguous: the queries (or the pass's rows)
    cols_ptr,          # [L, C, D] same dtype: the candidates
    positives_ptr,     # [R] int32: row i's positive column, -1 when it lies in another block
    bounds_ptr,        # [M + 1] int32: 0, d_1, ..., d_M (segment m is [bounds[m], bounds[m + 1]))
    active_ptr,        # [L, M] int32: 1 where pair (l, m) is computed
    n_seg_ptr,         # [L] int32: segments up to the layer's largest active dim (its `top`)
    inv_rows_ptr,      # [L, R, M] fp32: 1 / max(|x[:d_m]|, eps) (ones for dot)
    inv_cols_ptr,      # [L, C, M] fp32: the same for the columns
    max_ptr,           # [L, R, M] fp32 out: the row maximum (or the fixed one), log2 units
    logsum_ptr,        # [L, R, M] fp32 out: log2 sum_j exp2(z_j - max)
    row_loss_ptr,      # [L, R, M] fp32 out: (max - z_p) + logsum, log2 units
    dscale_ptr,        # [L, R, M] fp32 out (SCALE_GRAD): d row loss / d scale
    row_group_ptr,     # [R] int32 (EXCLUDE_GROUP, PENALTY_MODE): row i's group g_i
    guide_rows_ptr,    # [R, DG] fp32 (GUIDED): unit guide embeddings of the rows
    guide_cols_ptr,    # [C, DG] fp32 (GUIDED): of the columns
    guide_thr_ptr,     # [R] fp32 (GUIDED): drop column j when guide_i . guide_j > thr_i
    teacher_sum_ptr,   # [L, R, M] fp32 out (TEACHER): sum_j exp2(z_T,j - max_T) z_j
    col_sum_ptr,       # [L, K, M] fp32 in/out (COLUMN_STATS): atomic sums of exp2(z_col - scale_log2)
    L, R, C, D,        # layers, rows, columns, features (the row stride)
    DG,                # guide width (GUIDED)
    G,                 # group period: column j belongs to group j % G
    K,                 # statistic columns: the first K (COLUMN_STATS)
    scale_log2,        # scale * log2(e): logits in log2 units
    penalty_log2,      # penalty strength * log2(e) (PENALTY_MODE)
    R_CLASS, C_CLASS,  # next powers of two of R and C: the autotuner's key, unused in the body
    M: tl.constexpr,             # number of dims
    M_PAD: tl.constexpr,         # M rounded up to a power of two (>= 2): the width of the statistics tiles
    FIXED_MAX: tl.constexpr,     # every logit <= scale (+ penalty): no running maximum (numerics.fixed_max_is_exact)
    ALIGNED: tl.constexpr,       # every dim a multiple of BLOCK_D: flat k-loop, no k mask
    SCALE_GRAD: tl.constexpr,    # also write dscale
    DOT_PRECISION: tl.constexpr,  # tl.dot precision of fp32 inputs ("tf32x3" on the GPU)
    DOT_IN_FP32: tl.constexpr,   # multiply bf16 tiles in fp32 (the interpreter's tl.dot misreads bf16)
    SIMILARITY_DOT: tl.constexpr,  # rules.similarity == "dot": no norms, running maximum
    EXCLUDE_GROUP: tl.constexpr,   # rules.exclude_own_group
    PENALTY_MODE: tl.constexpr,    # rules.PENALTY_CODES[rules.penalty]
    GUIDED: tl.constexpr,          # rules.guided
    TEACHER: tl.constexpr,         # rules.teacher: one program walks every layer per column tile
    TRIANGLE: tl.constexpr,        # rules.triangle: only j > i is scored
    COLUMN_STATS: tl.constexpr,    # rules.column_statistics > 0
    BLOCK_R: tl.constexpr,       # rows per tile
    BLOCK_C: tl.constexpr,       # columns per tile
    BLOCK_D: tl.constexpr,       # k-chunk of the product (triton_configs._block_d), shared with the backward
    BLOCK_DG: tl.constexpr,      # k-chunk of the guide product
):
    """Grid (row block, layer), or (row block, 1) with TEACHER; 2 * R * C * top FLOPs per layer (plus
    one teacher product per tile with TEACHER, plus the guide product per tile when GUIDED). Per row
    and active pair, in log2 units: the row maximum (or the fixed one), log2 sum_j exp2(z_j - max), the
    row loss (max - z_p) + log2 sum, (SCALE_GRAD) d row loss / d scale = (sum_j p_j (z_j - max) + max -
    z_p) / scale_log2 and (TEACHER) sum_j exp2(z_T,j - max_T) z_j, from one accumulator over [0, top)
    with the (layer, dim) epilogue at every nested-dim boundary. The rules (rules.py) are compile-time:
    the plain pass compiles to the same code as without them. With TEACHER a program walks every layer
    for each column tile (the teacher tile, layer L - 1 at its top dim, is computed once per tile and
    shared), keeping the running statistics in the output tables between tiles.
    TRIANGLE: the column loop starts at the first tile holding an entry j > i (tiles wholly at or below the
    diagonal are skipped: no product, no exp). COLUMN_STATS (K > 0, never with TEACHER): also
    col_sum[l, j, m] += sum_i exp2(z_col(i, j) - scale_log2) for j < K, z_col without the penalty, by
    atomic adds (the order of the row blocks' adds is not fixed: the last bits vary from run to run)."""
    pid_r = tl.program_id(0)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    row_pos = tl.load(positives_ptr + r, mask=r_mask, other=-1)
    m_ids = tl.arange(0, M_PAD)
    stat_mask = r_mask[:, None] & (m_ids < M)[None, :]
    EXCLUDES: tl.constexpr = EXCLUDE_GROUP or GUIDED or TRIANGLE
    if TRIANGLE:  # the first column tile holding column i + 1 of the block's first row i
        c_start = (pid_r * BLOCK_R + 1) // BLOCK_C * BLOCK_C
    else:
        c_start = 0
    if PENALTY_MODE == 0:
        fixed_max = scale_log2
    else:
        fixed_max = scale_log2 + penalty_log2
    if TEACHER:
        for layer_i in range(0, L):
            layer = (layer_i + tl.zeros([], tl.int64))
            stat_offsets = (layer * R + r)[:, None] * M + m_ids[None, :]
            run_max, run_sum = _initial_statistics(active_ptr, layer, m_ids, FIXED_MAX, fixed_max, M, BLOCK_R, M_PAD)
            tl.store(max_ptr + stat_offsets, run_max, mask=stat_mask)
            tl.store(logsum_ptr + stat_offsets, run_sum, mask=stat_mask)  # the sum itself until the end
            tl.store(row_loss_ptr + stat_offsets, tl.zeros([BLOCK_R, M_PAD], tl.float32), mask=stat_mask)
            tl.store(teacher_sum_ptr + stat_offsets, tl.zeros([BLOCK_R, M_PAD], tl.float32), mask=stat_mask)
        t_layer = tl.cast(L - 1, tl.int64)  # L may be the constant 1 (Triton specialises 1s)
        t_seg = tl.load(n_seg_ptr + t_layer)  # the caller guarantees pair (L - 1, M - 1) is active
        t_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for c0 in range(c_start, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            y_offsets = c * D
            is_pos = c[None, :] == row_pos[:, None]
            has_pos = tl.sum(is_pos.to(tl.int32)) > 0
            keep, penalised = _tile_rules(r, c, r_mask, c_mask, row_pos, row_group_ptr, guide_rows_ptr,
                                          guide_cols_ptr, guide_thr_ptr, G, DG, R, EXCLUDE_GROUP, PENALTY_MODE,
                                          GUIDED, TRIANGLE, BLOCK_R, BLOCK_C, BLOCK_DG)
            acc = _accumulate_layer(tl.zeros([BLOCK_R, BLOCK_C], tl.float32), rows_ptr + t_layer * R * D, r * D,
                                    cols_ptr + t_layer * C * D, y_offsets, r_mask, c_mask, bounds_ptr, t_seg, ALIGNED,
                                    ALIGNED, BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
            z_t = _pair_logits(acc, t_layer, M - 1, r, c, r_mask, c_mask, keep, penalised, inv_rows_ptr,
                               inv_cols_ptr, R, C, scale_log2, penalty_log2, M, SIMILARITY_DOT, PENALTY_MODE)
            if FIXED_MAX:
                t_weight = tl.exp2(z_t - fixed_max)
                t_rescale = tl.full([BLOCK_R], 1.0, tl.float32)
            else:  # the same running maximum as pair (L - 1, M - 1): the offset it returns
                new_max = tl.maximum(t_max, tl.max(z_t, axis=1))
                t_rescale = tl.where(t_max == float("-inf"), 1.0, tl.exp2(t_max - new_max))
                t_weight = tl.exp2(z_t - tl.where(new_max == float("-inf"), 0.0, new_max)[:, None])
                t_max = new_max
            for layer_i in range(0, L):
                layer = (layer_i + tl.zeros([], tl.int64))
                n_seg = tl.load(n_seg_ptr + layer)
                stat_offsets = (layer * R + r)[:, None] * M + m_ids[None, :]
                tl.debug_barrier()  # the tables were written in another register layout
                run_max = tl.load(max_ptr + stat_offsets, mask=stat_mask, other=0.0)
                run_sum = tl.load(logsum_ptr + stat_offsets, mask=stat_mask, other=1.0)
                pos_logit = tl.load(row_loss_ptr + stat_offsets, mask=stat_mask, other=0.0)
                t_sum = tl.load(teacher_sum_ptr + stat_offsets, mask=stat_mask, other=0.0)
                run_max, run_sum, _, pos_logit, t_sum = _forward_tile(
                    run_max, run_sum, 0.0, pos_logit, t_sum, t_weight, t_rescale,
                    rows_ptr + layer * R * D, r * D, cols_ptr + layer * C * D, y_offsets, r, c, r_mask, c_mask, keep,
                    penalised, is_pos, has_pos, layer, n_seg, bounds_ptr, active_ptr, inv_rows_ptr, inv_cols_ptr,
                    R, C, scale_log2, penalty_log2, col_sum_ptr, K, False, M, M_PAD, FIXED_MAX, ALIGNED, False,
                    DOT_PRECISION, DOT_IN_FP32, SIMILARITY_DOT, EXCLUDES, PENALTY_MODE, TEACHER, False, BLOCK_R,
                    BLOCK_C, BLOCK_D)
                tl.store(max_ptr + stat_offsets, run_max, mask=stat_mask)
                tl.store(logsum_ptr + stat_offsets, run_sum, mask=stat_mask)
                tl.store(row_loss_ptr + stat_offsets, pos_logit, mask=stat_mask)
                tl.store(teacher_sum_ptr + stat_offsets, t_sum, mask=stat_mask)
        for layer_i in range(0, L):
            stat_offsets = ((layer_i + tl.zeros([], tl.int64)) * R + r)[:, None] * M + m_ids[None, :]
            tl.debug_barrier()
            run_max = tl.load(max_ptr + stat_offsets, mask=stat_mask, other=0.0)
            run_sum = tl.load(logsum_ptr + stat_offsets, mask=stat_mask, other=1.0)
            pos_logit = tl.load(row_loss_ptr + stat_offsets, mask=stat_mask, other=0.0)
            # A row whose every column is excluded: offset 0 (finite), log2 sum -inf.
            run_max = tl.where(run_max == float("-inf"), 0.0, run_max)
            tl.store(max_ptr + stat_offsets, run_max, mask=stat_mask)
            tl.store(logsum_ptr + stat_offsets, tl.log2(run_sum), mask=stat_mask)
            tl.store(row_loss_ptr + stat_offsets, (run_max - pos_logit) + tl.log2(run_sum), mask=stat_mask)
    else:
        layer = tl.program_id(1).to(tl.int64)
        n_seg = tl.load(n_seg_ptr + layer)
        x_base = rows_ptr + layer * R * D
        x_offsets = r * D
        stat_offsets = (layer * R + r)[:, None] * M + m_ids[None, :]
        run_max, run_sum = _initial_statistics(active_ptr, layer, m_ids, FIXED_MAX, fixed_max, M, BLOCK_R, M_PAD)
        run_wsum = tl.zeros([BLOCK_R, M_PAD], tl.float32)  # sum_j e_j (z_j - max), SCALE_GRAD only
        pos_logit = tl.zeros([BLOCK_R, M_PAD], tl.float32)
        n_streamed = tl.where(n_seg > 0, C, 0)  # a layer without active pairs streams nothing
        for c0 in range(c_start, n_streamed, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            y_offsets = c * D
            is_pos = c[None, :] == row_pos[:, None]
            has_pos = tl.sum(is_pos.to(tl.int32)) > 0  # most tiles hold no positive: skip the extraction
            keep, penalised = _tile_rules(r, c, r_mask, c_mask, row_pos, row_group_ptr, guide_rows_ptr,
                                          guide_cols_ptr, guide_thr_ptr, G, DG, R, EXCLUDE_GROUP, PENALTY_MODE,
                                          GUIDED, TRIANGLE, BLOCK_R, BLOCK_C, BLOCK_DG)
            run_max, run_sum, run_wsum, pos_logit, _ = _forward_tile(
                run_max, run_sum, run_wsum, pos_logit, 0.0, 0.0, 0.0,
                x_base, x_offsets, cols_ptr + layer * C * D, y_offsets, r, c, r_mask, c_mask, keep, penalised,
                is_pos, has_pos, layer, n_seg, bounds_ptr, active_ptr, inv_rows_ptr, inv_cols_ptr, R, C, scale_log2,
                penalty_log2, col_sum_ptr, K, c0 < K, M, M_PAD, FIXED_MAX, ALIGNED, SCALE_GRAD, DOT_PRECISION,
                DOT_IN_FP32, SIMILARITY_DOT, EXCLUDES, PENALTY_MODE, TEACHER, COLUMN_STATS, BLOCK_R, BLOCK_C, BLOCK_D)
        if EXCLUDES:  # a row whose every column is excluded: offset 0 (finite), log2 sum -inf
            run_max = tl.where(run_max == float("-inf"), 0.0, run_max)
        tl.store(max_ptr + stat_offsets, run_max, mask=stat_mask)
        tl.store(logsum_ptr + stat_offsets, tl.log2(run_sum), mask=stat_mask)
        tl.store(row_loss_ptr + stat_offsets, (run_max - pos_logit) + tl.log2(run_sum), mask=stat_mask)
        if SCALE_GRAD:
            dscale = (run_wsum / run_sum + (run_max - pos_logit)) / scale_log2
            tl.store(dscale_ptr + stat_offsets, dscale, mask=stat_mask)

_m2d_fwd_kernel = triton.jit(_m2d_fwd_kernel)
# Autotuned variant of the same kernel (opt-in, M2D_TRITON_AUTOTUNE=1). The kernel overwrites its outputs
# except the column sums, atomic adds of every row block: those are zeroed before each trial run.
_m2d_fwd_tuned = _autotuned(_m2d_fwd_kernel, FORWARD_CONFIGS,
                            ("R_CLASS", "C_CLASS", "D", "M", "FIXED_MAX", "ALIGNED", "SCALE_GRAD", "BLOCK_D",
                             *RULE_FLAGS), reset_to_zero=["col_sum_ptr"])
