"""Tile helpers of the Triton kernels (``@triton.jit``, shared by the forward and the backward): segment
bounds, operand loads, the tensor-core product in each precision, the logits of a tile under the rules of
a pass (m2d_kernels/rules.py), and one layer's accumulation over its segments."""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _bound(bounds_ptr, m, ALIGNED: tl.constexpr):
    """Bound m (0, then the dims). ALIGNED: every bound is a multiple of BLOCK_D (>= 16), which lets the
    compiler issue 128-bit, pipelined (cp.async) operand loads."""
    bound = tl.load(bounds_ptr + m)
    if ALIGNED:
        bound = tl.multiple_of(bound, 16)
    return bound


@triton.jit
def _next_segment(bounds_ptr, m, n_seg, ALIGNED: tl.constexpr):
    """(m + 1, its upper bound) in a flat k-loop, once chunk k0 ends segment m (the bound stays in range)."""
    return m + 1, _bound(bounds_ptr, tl.minimum(m + 2, n_seg), ALIGNED)


@triton.jit
def _segment(bounds_ptr, m, ALIGNED: tl.constexpr):
    """[lo, hi) of segment m."""
    return _bound(bounds_ptr, m, ALIGNED), _bound(bounds_ptr, m + 1, ALIGNED)


@triton.jit
def _load_operand(base, offsets, row_mask, k, hi, ALIGNED: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """base[offsets[:, None] + k[None, :]]: a scalar base and int32 row offsets, so that no
    [rows, BLOCK_D] tile of 64-bit pointers is held in registers."""
    if ALIGNED:  # whole BLOCK_D chunks: the mask is constant along k
        x = tl.load(base + (offsets[:, None] + k[None, :]), mask=row_mask[:, None], other=0.0)
    else:
        x = tl.load(base + (offsets[:, None] + k[None, :]), mask=row_mask[:, None] & (k < hi)[None, :], other=0.0)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _round_to_bf16(x):
    """fp32 -> nearest bf16 (ties to even), kept in fp32: what the GPU's conversion does. The
    interpreter's own conversion truncates, so the CPU path rounds explicitly (NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def _to_tf32(x, ROUND: tl.constexpr):
    """x cut to tf32's 10 mantissa bits: rounded to nearest, ties away from zero (ROUND: ``cvt.rna.tf32.f32``),
    or truncated (a tensor core ignores the low 13 bits of an fp32 operand)."""
    bits = x.to(tl.uint32, bitcast=True)
    if ROUND:
        bits += 0x1000
    return (bits & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b. The interpreter multiplies fp32 exactly (numpy), so for fp32 inputs the launcher asks it for
    what the GPU computes: "tf32x3-emulated" is Triton's tf32x3 (its F32DotTC pass: big = rna(x), small = x -
    big, then small*big + big*small + big*big on tf32 tensor cores), "tf32-emulated" one tf32 product."""
    if DOT_PRECISION == "tf32x3-emulated":
        a_big = _to_tf32(a, True)
        b_big = _to_tf32(b, True)
        a_small = _to_tf32(a - a_big, False)
        b_small = _to_tf32(b - b_big, False)
        acc = tl.dot(a_small, b_big, acc, input_precision="ieee")
        acc = tl.dot(a_big, b_small, acc, input_precision="ieee")
        return tl.dot(a_big, b_big, acc, input_precision="ieee")
    elif DOT_PRECISION == "tf32-emulated":
        return tl.dot(_to_tf32(a, False), _to_tf32(b, False), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _mma_operand(h, FOR_COLS: tl.constexpr, ELEMENT: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """H (or, FOR_COLS, H^T) as an MMA operand of the inputs' type ELEMENT. The interpreter multiplies
    bf16 in fp32 (DOT_IN_FP32) but still rounds to bf16 first, as the GPU does."""
    if FOR_COLS:
        h = tl.trans(h)
    if DOT_IN_FP32:
        return _round_to_bf16(h)
    return h.to(ELEMENT)


@triton.jit
def _accumulate_segment(acc, x_base, x_offsets, y_base, y_offsets, x_mask, y_mask, lo, hi, ALIGNED: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc += X[:, lo:hi] Y[:, lo:hi]^T in BLOCK_D chunks from lo upwards (forward and backward
    call this with the same arguments, so they add the same chunks in the same order)."""
    for k0 in range(lo, hi, BLOCK_D):
        acc = _accumulate_chunk(acc, x_base, x_offsets, y_base, y_offsets, x_mask, y_mask, k0, hi, ALIGNED, BLOCK_D,
                                DOT_PRECISION, DOT_IN_FP32)
    return acc


@triton.jit
def _accumulate_chunk(acc, x_base, x_offsets, y_base, y_offsets, x_mask, y_mask, k0, hi, ALIGNED: tl.constexpr,
                      BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc += X[:, k0:k0 + BLOCK_D] Y[:, k0:k0 + BLOCK_D]^T (columns from hi on masked unless ALIGNED)."""
    k = k0 + tl.arange(0, BLOCK_D)
    x = _load_operand(x_base, x_offsets, x_mask, k, hi, ALIGNED, DOT_IN_FP32)
    y = _load_operand(y_base, y_offsets, y_mask, k, hi, ALIGNED, DOT_IN_FP32)
    return _dot(x, tl.trans(y), acc, DOT_PRECISION)


@triton.jit
def _logits(acc, rx, ry, scale_log2, penalised, penalty_log2, SIMILARITY_DOT: tl.constexpr,
            PENALTY_MODE: tl.constexpr):
    """z = scale * s (+ penalty_strength * s on the penalised columns) in log2 units, s = cos or
    (SIMILARITY_DOT) the plain dot product; one expression for forward and backward (bit-identical
    logits). The penalty is stop-grad: it changes z, never the factor d z / d s = scale."""
    if PENALTY_MODE == 0:
        if SIMILARITY_DOT:
            z = acc * scale_log2
        else:
            z = acc * (rx * scale_log2)[:, None] * ry[None, :]
    else:
        if SIMILARITY_DOT:
            s = acc
        else:
            s = acc * rx[:, None] * ry[None, :]
        z = s * tl.where(penalised, scale_log2 + penalty_log2, scale_log2)
    return z


@triton.jit
def _column(table, m, m_ids):
    """Column m of a [rows, M_PAD] register table."""
    return tl.sum(tl.where(m_ids[None, :] == m, table, 0.0), axis=1)


@triton.jit
def _guide_similarity(guide_rows_ptr, guide_cols_ptr, r, c, r_mask, c_mask, DG,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DG: tl.constexpr):
    """guide_rows[r] . guide_cols[c] for one tile: fp32 operands, full fp32 products (the threshold
    test must not move with tf32 rounding). Computed once per tile, shared by every (layer, dim)."""
    sim = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for k0 in range(0, DG, BLOCK_DG):
        k = k0 + tl.arange(0, BLOCK_DG)
        a = tl.load(guide_rows_ptr + (r * DG)[:, None] + k[None, :], mask=r_mask[:, None] & (k < DG)[None, :],
                    other=0.0)
        b = tl.load(guide_cols_ptr + (c * DG)[:, None] + k[None, :], mask=c_mask[:, None] & (k < DG)[None, :],
                    other=0.0)
        sim = tl.dot(a, tl.trans(b), sim, input_precision="ieee")
    return sim


@triton.jit
def _tile_rules(r, c, r_mask, c_mask, row_pos, row_group_ptr, guide_rows_ptr, guide_cols_ptr, guide_thr_ptr, G, DG, R,
                EXCLUDE_GROUP: tl.constexpr, PENALTY_MODE: tl.constexpr, GUIDED: tl.constexpr, TRIANGLE: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DG: tl.constexpr):
    """(keep, penalised) of one tile, shared by all (layer, dim) pairs (rules.py): keep is c_mask
    [1, BLOCK_C] for the plain pass, else [BLOCK_R, BLOCK_C] without the excluded columns (TRIANGLE:
    only j > i or j >= R); penalised is a [BLOCK_R, BLOCK_C] mask (PENALTY_MODE 1/2/3: in_batch/hard/all
    negatives) or 0."""
    keep = c_mask[None, :]
    if TRIANGLE:
        keep = keep & ((c[None, :] > r[:, None]) | (c >= R)[None, :])
    penalised = 0
    if EXCLUDE_GROUP or PENALTY_MODE != 0:
        group = tl.load(row_group_ptr + r, mask=r_mask, other=-1)
        own = (c % G)[None, :] == group[:, None]
        if EXCLUDE_GROUP:
            keep = keep & ~own
        if PENALTY_MODE == 1:
            penalised = ~own
        elif PENALTY_MODE == 2:
            penalised = own & (c >= G)[None, :]
        elif PENALTY_MODE == 3:
            penalised = c[None, :] != group[:, None]
    if GUIDED:
        sim = _guide_similarity(guide_rows_ptr, guide_cols_ptr, r, c, r_mask, c_mask, DG, BLOCK_R, BLOCK_C, BLOCK_DG)
        threshold = tl.load(guide_thr_ptr + r, mask=r_mask, other=0.0)
        keep = keep & (~(sim > threshold[:, None]) | (c[None, :] == row_pos[:, None]))
    return keep, penalised


@triton.jit
def _pair_logits(acc, layer, m, r, c, r_mask, c_mask, keep, penalised, inv_rows_ptr, inv_cols_ptr, R, C,
                 scale_log2, penalty_log2, M: tl.constexpr, SIMILARITY_DOT: tl.constexpr,
                 PENALTY_MODE: tl.constexpr):
    """Logits of pair (layer, m) for S_m = acc, -inf on the columns that are not kept."""
    if SIMILARITY_DOT:  # no normalisation: the inverse norms are not read
        rx = 1.0
        ry = 1.0
    else:
        rx = tl.load(inv_rows_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
        ry = tl.load(inv_cols_ptr + (layer * C + c) * M + m, mask=c_mask, other=0.0)
    return tl.where(keep, _logits(acc, rx, ry, scale_log2, penalised, penalty_log2, SIMILARITY_DOT, PENALTY_MODE),
                    float("-inf"))


@triton.jit
def _accumulate_layer(acc, x_base, x_offsets, y_base, y_offsets, x_mask, y_mask, bounds_ptr, n_seg,
                      ALIGNED: tl.constexpr, FLAT_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      DOT_IN_FP32: tl.constexpr):
    """acc += X[:, :top] Y[:, :top]^T in the same chunks and order as the pairs' loops (the teacher's
    logits are bit-identical to those of its pair): one flat loop (FLAT_K, needs ALIGNED) or segment by
    segment, which adds the same chunks in the same order when ALIGNED."""
    if FLAT_K:
        top = _bound(bounds_ptr, n_seg, ALIGNED)
        acc = _accumulate_segment(acc, x_base, x_offsets, y_base, y_offsets, x_mask, y_mask, 0, top, ALIGNED,
                                  BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
    else:
        for m in range(0, n_seg):
            lo, hi = _segment(bounds_ptr, m, ALIGNED)
            acc = _accumulate_segment(acc, x_base, x_offsets, y_base, y_offsets, x_mask, y_mask, lo, hi, ALIGNED,
                                      BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
    return acc
