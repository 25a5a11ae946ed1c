"""The Triton backward kernel: dX over row blocks or dY over column blocks, recomputing each tile's
similarities in the forward's order and summing the per-dim gradient tiles downwards (docs/design.md,
"The backward pass")."""

from __future__ import annotations

import triton
import triton.language as tl

from m2d_kernels.backends.triton_configs import (
    BACKWARD_CONFIGS,
    RULE_FLAGS,
    _autotuned,
)
from m2d_kernels.backends.triton_tiles import (
    _accumulate_chunk,
    _accumulate_layer,
    _accumulate_segment,
    _bound,
    _column,
    _dot,
    _load_operand,
    _logits,
    _mma_operand,
    _next_segment,
    _pair_logits,
    _round_to_bf16,
    _segment,
    _tile_rules,
)


@triton.jit
def _zero_columns(base, offsets, mask, lo, hi, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """base[offsets[:, None] + k] = 0 for k in [lo, hi) and the rows in mask. The chunks count from 0, not from
    lo: the compiler knows they are aligned (128-bit stores) when hi is; lo falls inside a chunk only unless
    ALIGNED (then it is a multiple of BLOCK_D)."""
    for k0 in range(0, hi, BLOCK_D):
        if k0 + BLOCK_D > lo:
            k = k0 + tl.arange(0, BLOCK_D)
            span = mask[:, None] & (k < hi)[None, :]
            if not ALIGNED:
                span = span & (k >= lo)[None, :]
            tl.store(base + (offsets[:, None] + k[None, :]), tl.zeros([BLOCK, BLOCK_D], tl.float32), mask=span)


@triton.jit
def _weighted_gradient(acc, r, c, r_mask, c_mask, keep, penalised, p_teacher, row_pos, norm_sums, layer, m, m_ids,
                       inv_rows_ptr, inv_cols_ptr, norm_ptr, max_ptr, logsum_ptr, coef_ptr, distill_ptr,
                       col_offset_ptr, col_logsum_ptr, R, C, K, scale_log2, penalty_log2, M: tl.constexpr,
                       FOR_COLS: tl.constexpr, SIMILARITY_DOT: tl.constexpr, PENALTY_MODE: tl.constexpr,
                       TEACHER: tl.constexpr, COLUMN_STATS: tl.constexpr):
    """(W_m, norm_sums + norm * sum(G_m * cos_m) along the owner's axis in column m) for S_m = acc.
    G_m = coef * (p - onehot) (+ distill * (p - p_teacher) with TEACHER) (+ coef * p_col on the columns
    j < K with COLUMN_STATS), 0 where not kept; with SIMILARITY_DOT, W_m = G_m and there is no norm term."""
    if SIMILARITY_DOT:
        rx = 1.0
        ry = 1.0
    else:
        rx = tl.load(inv_rows_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
        ry = tl.load(inv_cols_ptr + (layer * C + c) * M + m, mask=c_mask, other=0.0)
    row_max = tl.load(max_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
    row_logsum = tl.load(logsum_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
    coef = tl.load(coef_ptr + layer * M + m)
    z = _logits(acc, rx, ry, scale_log2, penalised, penalty_log2, SIMILARITY_DOT, PENALTY_MODE)
    prob = tl.exp2((z - row_max[:, None]) - row_logsum[:, None])
    # The one-hot and the validity mask are rebuilt here rather than kept live as [rows, cols] tiles.
    onehot = (c[None, :] == row_pos[:, None]).to(tl.float32)
    if COLUMN_STATS:
        # The first K columns' softmaxes over the rows with the given (combined) statistics: z_col carries no
        # penalty, there is no one-hot on the column side, and log_sum = +inf beyond K makes the term 0 there.
        col_mask = c < K
        col_offset = tl.load(col_offset_ptr + (layer * K + c) * M + m, mask=col_mask, other=0.0)
        col_logsum = tl.load(col_logsum_ptr + (layer * K + c) * M + m, mask=col_mask, other=float("inf"))
        if PENALTY_MODE == 0:
            z_col = z
        else:
            z_col = _logits(acc, rx, ry, scale_log2, 0, 0.0, SIMILARITY_DOT, 0)
        prob += tl.exp2((z_col - col_offset[None, :]) - col_logsum[None, :])
    if TEACHER:
        distill = tl.load(distill_ptr + layer * M + m)
        grad = (coef + distill) * prob - coef * onehot - distill * p_teacher
    else:
        grad = coef * (prob - onehot)
    # where, not a product: the excluded columns' probabilities may be inf or NaN.
    grad_cos = tl.where(r_mask[:, None] & keep, grad, 0.0)
    if SIMILARITY_DOT:
        w = grad_cos
    else:
        cos = acc * rx[:, None] * ry[None, :]
        if FOR_COLS:
            norm = tl.load(norm_ptr + (layer * C + c) * M + m, mask=c_mask, other=0.0)
            norm_sum = norm * tl.sum(grad_cos * cos, axis=0)
        else:
            norm = tl.load(norm_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
            norm_sum = norm * tl.sum(grad_cos * cos, axis=1)
        norm_sums += tl.where(m_ids[None, :] == m, norm_sum[:, None], 0.0)
        w = grad_cos * rx[:, None] * ry[None, :]
    return w, norm_sums


@triton.jit
def _add_slot(h, slot_ptrs, active_ptr, layer, m, M: tl.constexpr):
    """H + W_m (from its tile slot) if pair (layer, m) is active, else H."""
    if tl.load(active_ptr + layer * M + m) != 0:
        h += tl.load(slot_ptrs)
    return h


@triton.jit
def _product_chunk(h_op, x_base, x_offsets, y_base, y_offsets, work_base, work_offsets, r_mask, c_mask, k0, hi,
                   FOR_COLS: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DOT_IN_FP32: tl.constexpr, BLOCK_D: tl.constexpr):
    """work[:, k0:k0 + BLOCK_D] += H Y[:, chunk] (rows) or (FOR_COLS) H^T X[:, chunk], h_op = the operand;
    columns from hi on masked unless ALIGNED."""
    k = k0 + tl.arange(0, BLOCK_D)
    if FOR_COLS:
        io_mask = c_mask[:, None] & (k < hi)[None, :]
        other = _load_operand(x_base, x_offsets, r_mask, k, hi, ALIGNED, DOT_IN_FP32)
    else:
        io_mask = r_mask[:, None] & (k < hi)[None, :]
        other = _load_operand(y_base, y_offsets, c_mask, k, hi, ALIGNED, DOT_IN_FP32)
    grad = tl.load(work_base + (work_offsets[:, None] + k[None, :]), mask=io_mask, other=0.0)
    grad = _dot(h_op, other, grad, DOT_PRECISION)
    tl.store(work_base + (work_offsets[:, None] + k[None, :]), grad, mask=io_mask)


@triton.jit
def _store_slot(acc, slot_ptrs, r, c, r_mask, c_mask, keep, penalised, p_teacher, row_pos, norm_sums, layer, m, m_ids,
                active_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr, max_ptr, logsum_ptr, coef_ptr, distill_ptr,
                col_offset_ptr, col_logsum_ptr, R, C, K, scale_log2, penalty_log2, M: tl.constexpr,
                FOR_COLS: tl.constexpr, SIMILARITY_DOT: tl.constexpr, PENALTY_MODE: tl.constexpr,
                TEACHER: tl.constexpr, COLUMN_STATS: tl.constexpr):
    """W_m of S_m = acc to its tile slot if pair (layer, m) is active; returns the updated norm_sums."""
    if tl.load(active_ptr + layer * M + m) != 0:
        w, norm_sums = _weighted_gradient(acc, r, c, r_mask, c_mask, keep, penalised, p_teacher, row_pos, norm_sums,
                                          layer, m, m_ids, inv_rows_ptr, inv_cols_ptr, norm_ptr, max_ptr, logsum_ptr,
                                          coef_ptr, distill_ptr, col_offset_ptr, col_logsum_ptr, R, C, K, scale_log2,
                                          penalty_log2, M, FOR_COLS, SIMILARITY_DOT, PENALTY_MODE, TEACHER,
                                          COLUMN_STATS)
        tl.store(slot_ptrs, w)
    return norm_sums


@triton.jit
def _backward_tile(
    x_base, x_offsets, y_base, y_offsets, work_base, work_offsets, slot_ptr, r, c, r_mask, c_mask, row_pos,
    norm_sums, layer, n_seg,
    bounds_ptr, active_ptr, n_seg_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr, max_ptr, logsum_ptr, coef_ptr, R, C,
    scale_log2, rows_ptr, cols_ptr, row_group_ptr, guide_rows_ptr, guide_cols_ptr, guide_thr_ptr, distill_ptr,
    col_offset_ptr, col_logsum_ptr, L, D, DG, G, K, penalty_log2,
    M: tl.constexpr, M_PAD: tl.constexpr, FOR_COLS: tl.constexpr, ALIGNED: tl.constexpr, FLAT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, ELEMENT: tl.constexpr,
    SIMILARITY_DOT: tl.constexpr, EXCLUDE_GROUP: tl.constexpr, PENALTY_MODE: tl.constexpr, GUIDED: tl.constexpr,
    TEACHER: tl.constexpr, TRIANGLE: tl.constexpr, COLUMN_STATS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
):
    """One [rows, cols] tile: 2 * BLOCK_R * BLOCK_C * top FLOPs to recompute S (upwards, the
    forward's order) writing W_m to slot m at each active boundary below the top one (the top W
    stays in registers as the first H), then 2 * BLOCK_R * BLOCK_C * top for the product, walking
    the segments downwards with H = sum of the W so far: H Y[:, seg] (rows) or H^T X[:, seg] (cols)
    into the owner's fp32 work rows.
    The rules' masks (and the guide product) are computed once per tile for all dims; with TEACHER
    the teacher's probabilities take one more product over layer L - 1's [0, top) per tile.
    Returns norm_sums + norm * sum(G_m * cos_m) along the owner's axis, per dim."""
    m_ids = tl.arange(0, M_PAD)
    keep, penalised = _tile_rules(r, c, r_mask, c_mask, row_pos, row_group_ptr, guide_rows_ptr, guide_cols_ptr,
                                  guide_thr_ptr, G, DG, R, EXCLUDE_GROUP, PENALTY_MODE, GUIDED, TRIANGLE, BLOCK_R,
                                  BLOCK_C, BLOCK_DG)
    p_teacher = 0.0
    if TEACHER:
        t_layer = tl.cast(L - 1, tl.int64)  # L may be the constant 1 (Triton specialises 1s)
        acc = _accumulate_layer(tl.zeros([BLOCK_R, BLOCK_C], tl.float32), rows_ptr + t_layer * R * D, x_offsets,
                                cols_ptr + t_layer * C * D, y_offsets, r_mask, c_mask, bounds_ptr,
                                tl.load(n_seg_ptr + t_layer), ALIGNED, FLAT_K, BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
        z_t = _pair_logits(acc, t_layer, M - 1, r, c, r_mask, c_mask, keep, penalised, inv_rows_ptr, inv_cols_ptr,
                           R, C, scale_log2, penalty_log2, M, SIMILARITY_DOT, PENALTY_MODE)
        t_max = tl.load(max_ptr + (t_layer * R + r) * M + M - 1, mask=r_mask, other=0.0)
        t_logsum = tl.load(logsum_ptr + (t_layer * R + r) * M + M - 1, mask=r_mask, other=0.0)
        p_teacher = tl.exp2((z_t - t_max[:, None]) - t_logsum[:, None])
    # int32 offsets from a scalar base: a [rows, cols] tile of 64-bit pointers would hold twice the registers.
    slot_offsets = tl.arange(0, BLOCK_R)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    top_m = n_seg - 1
    if FLAT_K:  # one flat k-loop over [0, top), as the forward's (the pipeline runs on across the boundaries)
        top = _bound(bounds_ptr, n_seg, ALIGNED)
        m = 0
        hi = _bound(bounds_ptr, 1, ALIGNED)
        for k0 in range(0, top, BLOCK_D):
            acc = _accumulate_chunk(acc, x_base, x_offsets, y_base, y_offsets, r_mask, c_mask, k0, hi, ALIGNED,
                                    BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
            if k0 + BLOCK_D == hi:
                if m < top_m:
                    norm_sums = _store_slot(
                        acc, slot_ptr + m * BLOCK_R * BLOCK_C + slot_offsets, r, c, r_mask, c_mask, keep, penalised,
                        p_teacher, row_pos, norm_sums, layer, m, m_ids, active_ptr, inv_rows_ptr, inv_cols_ptr,
                        norm_ptr, max_ptr, logsum_ptr, coef_ptr, distill_ptr, col_offset_ptr, col_logsum_ptr, R, C, K,
                        scale_log2, penalty_log2, M, FOR_COLS, SIMILARITY_DOT, PENALTY_MODE, TEACHER, COLUMN_STATS)
                m, hi = _next_segment(bounds_ptr, m, n_seg, ALIGNED)
    else:
        for m in range(0, n_seg):
            lo, hi = _segment(bounds_ptr, m, ALIGNED)
            acc = _accumulate_segment(acc, x_base, x_offsets, y_base, y_offsets, r_mask, c_mask, lo, hi, ALIGNED,
                                      BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
            if m < top_m:
                norm_sums = _store_slot(
                    acc, slot_ptr + m * BLOCK_R * BLOCK_C + slot_offsets, r, c, r_mask, c_mask, keep, penalised,
                    p_teacher, row_pos, norm_sums, layer, m, m_ids, active_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr,
                    max_ptr, logsum_ptr, coef_ptr, distill_ptr, col_offset_ptr, col_logsum_ptr, R, C, K, scale_log2,
                    penalty_log2, M, FOR_COLS, SIMILARITY_DOT, PENALTY_MODE, TEACHER, COLUMN_STATS)
    # The top segment (always active: n_seg ends at the last active dim) needs no slot: its W is
    # the first H. One k-loop for all segments (no peeled copy), so acc here is S_top.
    h, norm_sums = _weighted_gradient(acc, r, c, r_mask, c_mask, keep, penalised, p_teacher, row_pos, norm_sums,
                                      layer, top_m, m_ids, inv_rows_ptr, inv_cols_ptr, norm_ptr, max_ptr, logsum_ptr,
                                      coef_ptr, distill_ptr, col_offset_ptr, col_logsum_ptr, R, C, K, scale_log2,
                                      penalty_log2, M, FOR_COLS, SIMILARITY_DOT, PENALTY_MODE, TEACHER, COLUMN_STATS)
    tl.debug_barrier()  # the slots are read back in another register layout (other threads)
    if FLAT_K:  # one flat loop downwards over [0, top): H takes W_m at the boundary below segment m + 1
        m = top_m
        lo = _bound(bounds_ptr, top_m, ALIGNED)
        h_op = _mma_operand(h, FOR_COLS, ELEMENT, DOT_IN_FP32)
        for i in range(0, top, BLOCK_D):
            k0 = top - BLOCK_D - i
            _product_chunk(h_op, x_base, x_offsets, y_base, y_offsets, work_base, work_offsets, r_mask, c_mask, k0,
                           top, FOR_COLS, ALIGNED, DOT_PRECISION, DOT_IN_FP32, BLOCK_D)
            if (k0 == lo) & (m > 0):
                m -= 1
                lo = _bound(bounds_ptr, m, ALIGNED)
                h = _add_slot(h, slot_ptr + m * BLOCK_R * BLOCK_C + slot_offsets, active_ptr, layer, m, M)
                h_op = _mma_operand(h, FOR_COLS, ELEMENT, DOT_IN_FP32)
    else:
        for step in range(0, n_seg):
            m = n_seg - 1 - step
            lo, hi = _segment(bounds_ptr, m, ALIGNED)
            if step > 0:
                h = _add_slot(h, slot_ptr + m * BLOCK_R * BLOCK_C + slot_offsets, active_ptr, layer, m, M)
            for k0 in range(lo, hi, BLOCK_D):  # the operand converted in the loop: fewer registers live across it
                h_op = _mma_operand(h, FOR_COLS, ELEMENT, DOT_IN_FP32)
                _product_chunk(h_op, x_base, x_offsets, y_base, y_offsets, work_base, work_offsets, r_mask, c_mask, k0,
                               hi, FOR_COLS, ALIGNED, DOT_PRECISION, DOT_IN_FP32, BLOCK_D)
    tl.debug_barrier()  # the next tile overwrites the slots
    return norm_sums


@triton.jit
def _store_gradient(grad_base, work_base, own_base, own_offsets, work_offsets, mask, norm_sums, bounds_ptr, n_seg,
                    top, D, ALIGNED: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK: tl.constexpr,
                    M_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad[:, seg_s] = work[:, seg_s] - (sum_{m >= s} norm_sums[:, m]) * own[:, seg_s] in the
    gradient's dtype, walking s downwards; zero beyond the largest active dim. Scalar bases and int32 row
    offsets (own_offsets for grad and own, work_offsets for the work rows), as the operand loads."""
    tl.debug_barrier()  # the work rows were written in the MMA's register layout
    m_ids = tl.arange(0, M_PAD)
    suffix = tl.zeros([BLOCK], tl.float32)
    for step in range(0, n_seg):
        m = n_seg - 1 - step
        suffix += _column(norm_sums, m, m_ids)
        lo, hi = _segment(bounds_ptr, m, ALIGNED)
        for k0 in range(lo, hi, BLOCK_D):
            k = k0 + tl.arange(0, BLOCK_D)
            io_mask = mask[:, None] & (k < hi)[None, :]
            own = tl.load(own_base + (own_offsets[:, None] + k[None, :]), mask=io_mask, other=0.0).to(tl.float32)
            work = tl.load(work_base + (work_offsets[:, None] + k[None, :]), mask=io_mask, other=0.0)
            grad = work - suffix[:, None] * own
            if DOT_IN_FP32:  # bf16 under the interpreter: round as the GPU's store does
                grad = _round_to_bf16(grad)
            tl.store(grad_base + (own_offsets[:, None] + k[None, :]), grad, mask=io_mask)
    _zero_columns(grad_base, own_offsets, mask, top, D, ALIGNED, BLOCK, BLOCK_D)

def _m2d_bwd_kernel(
    rows_ptr,          # [L, R, D] bf16/fp16/fp32, rows contiguous
    cols_ptr,          # [L, C, D] same dtype
    positives_ptr,     # [R] int32: row i's positive column, -1 when it lies in another block
    bounds_ptr,        # [M + 1] int32: 0, d_1, ..., d_M
    active_ptr,        # [L, M] int32: 1 where pair (l, m) is computed
    n_seg_ptr,         # [L] int32: segments up to the layer's largest active dim
    inv_rows_ptr,      # [L, R, M] fp32: 1 / max(|x[:d_m]|, eps) (ones for dot)
    inv_cols_ptr,      # [L, C, M] fp32: the same for the columns
    norm_ptr,          # [L, R or C, M] fp32: the owner's rx^2 (ry^2 with FOR_COLS), 0 where the norm was clamped
    max_ptr,           # [L, R, M] fp32: the forward's (combined) row maximum, log2 units
    logsum_ptr,        # [L, R, M] fp32: its log2 sum
    coef_ptr,          # [L, M] fp32: d total / d row loss, times scale
    grad_ptr,          # [L, R or C, D] out, the input dtype: dX, or dY with FOR_COLS
    work_ptr,          # [programs * block, D] fp32 scratch: each program's owner-block accumulator
    slots_ptr,         # [programs * (M - 1) * BLOCK_R * BLOCK_C] fp32 scratch: each program's W_m tiles
    row_group_ptr,     # [R] int32 (EXCLUDE_GROUP, PENALTY_MODE): row i's group
    guide_rows_ptr,    # [R, DG] fp32 (GUIDED)
    guide_cols_ptr,    # [C, DG] fp32 (GUIDED)
    guide_thr_ptr,     # [R] fp32 (GUIDED)
    distill_ptr,       # [L, M] fp32 (TEACHER): the distillation coefficients, times scale
    col_offset_ptr,    # [L, K, M] fp32 (COLUMN_STATS): the columns' (combined) offsets, log2 units
    col_logsum_ptr,    # [L, K, M] fp32 (COLUMN_STATS): their log2 sums
    L, R, C, D,        # layers, rows, columns, features
    DG,                # guide width
    G,                 # group period
    K,                 # statistic columns
    scale_log2,        # scale * log2(e)
    penalty_log2,      # penalty strength * log2(e)
    R_CLASS, C_CLASS,  # the autotuner's key, unused in the body
    M: tl.constexpr,             # number of dims
    M_PAD: tl.constexpr,         # M rounded up to a power of two (>= 2)
    ALIGNED: tl.constexpr,       # every dim a multiple of BLOCK_D
    DOT_PRECISION: tl.constexpr,  # tl.dot precision of fp32 inputs
    DOT_IN_FP32: tl.constexpr,   # multiply bf16 tiles in fp32 (interpreter)
    FOR_COLS: tl.constexpr,      # False: dX, programs own row blocks; True: dY, programs own column blocks
    SIMILARITY_DOT: tl.constexpr,  # the rules, as in the forward
    EXCLUDE_GROUP: tl.constexpr,
    PENALTY_MODE: tl.constexpr,
    GUIDED: tl.constexpr,
    TEACHER: tl.constexpr,         # here: a distillation gradient (distill_ptr)
    TRIANGLE: tl.constexpr,
    COLUMN_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr,       # rows per tile
    BLOCK_C: tl.constexpr,       # columns per tile
    BLOCK_D: tl.constexpr,       # the forward's k-chunk: bit-identical recompute
    BLOCK_DG: tl.constexpr,      # k-chunk of the guide product
):
    """Persistent grid over work items (layer, owner block): dX of a row block streaming over column
    tiles, or (FOR_COLS) dY of a column block streaming over row tiles; 4 * R * C * top FLOPs per
    layer per launch. Each program owns its fp32 work rows (block x D) and M - 1 tile slots
    (BLOCK_R x BLOCK_C), so the scratch is bounded by the number of programs, not the batch.
    norm_ptr is rx^2 (or ry^2) where the norm was not clamped to eps, else 0. TRIANGLE: dX's column loop
    starts, and dY's row loop stops, at the tiles wholly at or below the diagonal (skipped). COLUMN_STATS:
    the first K columns' softmaxes (col_offset / col_logsum [L, K, M], log2 units) join G."""
    pid = tl.program_id(0)
    ELEMENT: tl.constexpr = rows_ptr.dtype.element_ty
    # Flat k-loops (as the forward's) for the plain pass only: with rules the mask, column-statistic and
    # teacher tiles stay live across the loops, and per-segment loops keep their register pressure lower.
    FLAT_K: tl.constexpr = ALIGNED and not (SIMILARITY_DOT or EXCLUDE_GROUP or PENALTY_MODE != 0 or GUIDED or TEACHER
                                            or TRIANGLE or COLUMN_STATS)
    own_block: tl.constexpr = BLOCK_C if FOR_COLS else BLOCK_R
    n_blocks = tl.cdiv(C if FOR_COLS else R, own_block)
    work_base = work_ptr + pid.to(tl.int64) * own_block * D
    work_offsets = tl.arange(0, own_block) * D
    slot_ptr = slots_ptr + pid.to(tl.int64) * (M - 1) * BLOCK_R * BLOCK_C
    for work in range(pid, L * n_blocks, tl.num_programs(0)):
        layer = (work // n_blocks).to(tl.int64)
        block = work % n_blocks
        n_seg = tl.load(n_seg_ptr + layer)
        top = tl.load(bounds_ptr + n_seg)
        own = block * own_block + tl.arange(0, own_block)
        own_mask = own < (C if FOR_COLS else R)
        _zero_columns(work_base, work_offsets, own_mask, 0, _bound(bounds_ptr, n_seg, ALIGNED), ALIGNED, own_block,
                      BLOCK_D)
        tl.debug_barrier()
        norm_sums = tl.zeros([own_block, M_PAD], tl.float32)
        if FOR_COLS:
            y_base = cols_ptr + layer * C * D
            y_offsets = own * D
            own_base = y_base
            own_offsets = y_offsets
            n_streamed = tl.where(n_seg > 0, R, 0)
            if TRIANGLE:  # row tiles from the block's last column on hold only j <= i
                n_streamed = tl.minimum(n_streamed, tl.minimum(block * own_block + own_block, C) - 1)
            for r0 in range(0, n_streamed, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_mask = r < R
                row_pos = tl.load(positives_ptr + r, mask=r_mask, other=-1)
                x_offsets = r * D
                norm_sums = _backward_tile(
                    rows_ptr + layer * R * D, x_offsets, y_base, y_offsets, work_base, work_offsets, slot_ptr, r,
                    own, r_mask, own_mask, row_pos, norm_sums, layer,
                    n_seg, bounds_ptr, active_ptr, n_seg_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr, max_ptr,
                    logsum_ptr, coef_ptr, R, C, scale_log2, rows_ptr, cols_ptr, row_group_ptr, guide_rows_ptr,
                    guide_cols_ptr, guide_thr_ptr, distill_ptr, col_offset_ptr, col_logsum_ptr, L, D, DG, G, K,
                    penalty_log2, M, M_PAD, FOR_COLS, ALIGNED, FLAT_K, DOT_PRECISION, DOT_IN_FP32, ELEMENT,
                    SIMILARITY_DOT, EXCLUDE_GROUP, PENALTY_MODE, GUIDED, TEACHER, TRIANGLE, COLUMN_STATS, BLOCK_R,
                    BLOCK_C, BLOCK_D, BLOCK_DG,
                )
        else:
            x_base = rows_ptr + layer * R * D
            x_offsets = own * D
            own_base = x_base
            own_offsets = x_offsets
            row_pos = tl.load(positives_ptr + own, mask=own_mask, other=-1)
            n_streamed = tl.where(n_seg > 0, C, 0)
            if TRIANGLE:  # the first column tile holding column i + 1 of the block's first row i
                c_start = (block * own_block + 1) // BLOCK_C * BLOCK_C
            else:
                c_start = 0
            for c0 in range(c_start, n_streamed, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_mask = c < C
                y_offsets = c * D
                norm_sums = _backward_tile(
                    x_base, x_offsets, cols_ptr + layer * C * D, y_offsets, work_base, work_offsets, slot_ptr, own,
                    c, own_mask, c_mask, row_pos, norm_sums, layer,
                    n_seg, bounds_ptr, active_ptr, n_seg_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr, max_ptr,
                    logsum_ptr, coef_ptr, R, C, scale_log2, rows_ptr, cols_ptr, row_group_ptr, guide_rows_ptr,
                    guide_cols_ptr, guide_thr_ptr, distill_ptr, col_offset_ptr, col_logsum_ptr, L, D, DG, G, K,
                    penalty_log2, M, M_PAD, FOR_COLS, ALIGNED, FLAT_K, DOT_PRECISION, DOT_IN_FP32, ELEMENT,
                    SIMILARITY_DOT, EXCLUDE_GROUP, PENALTY_MODE, GUIDED, TEACHER, TRIANGLE, COLUMN_STATS, BLOCK_R,
                    BLOCK_C, BLOCK_D, BLOCK_DG,
                )
        _store_gradient(grad_ptr + layer * (C if FOR_COLS else R) * D, work_base, own_base, own_offsets, work_offsets,
                        own_mask, norm_sums, bounds_ptr, n_seg, top, D, ALIGNED, DOT_IN_FP32, own_block, M_PAD, BLOCK_D)
        tl.debug_barrier()  # the next work item zeroes these work rows

_m2d_bwd_kernel = triton.jit(_m2d_bwd_kernel)
# Autotuned variant of the same kernel (opt-in): it zeroes its work rows itself.
_m2d_bwd_tuned = _autotuned(_m2d_bwd_kernel, BACKWARD_CONFIGS,
                            ("R_CLASS", "C_CLASS", "D", "M", "ALIGNED", "FOR_COLS", "BLOCK_D", *RULE_FLAGS))
