"""Backend ``triton``: fused kernels for all layers x all nested dims.

Everything is phrased as one "rows vs columns" InfoNCE: ``rows`` ``[L, R, D]`` are scored
against ``cols`` ``[L, C, D]`` and row ``i``'s positive is column ``positives[i]``. The
query-to-doc direction is (queries, docs, positive_index); the doc-to-query direction of
``symmetric`` is the same computation with roles swapped (docs[positive_index], queries,
arange(B)), so it reuses these kernels instead of a copy.

Math (docs/design.md, sections 1-3), per layer l, dim index m, segment ``seg_m = [d_{m-1}, d_m)``::

    S_m      = S_{m-1} + X[:, seg_m] Y[:, seg_m]^T          one fp32 accumulator over [0, top)
    z_m      = scale * cos_m = scale * diag(rx_m) S_m diag(ry_m),   rx_m = 1 / max(|x[:d_m]|, eps)
    loss_lm  = mean_i [ (max_i - z_m(i, p(i))) + log sum_j exp(z_m(i, j) - max_i) ]

Backward, ``G_m = coef_lm * (softmax_j(z_m) - onehot(p))`` with ``coef_lm = dL/dloss_lm * scale / R``,
``W_m = diag(rx_m) G_m diag(ry_m)`` and suffix sums over ``m >= s``::

    dX[:, seg_s] = H_s Y[:, seg_s]   - alpha_s * X[:, seg_s]   H_s = sum_{m>=s} W_m
    dY[:, seg_s] = H_s^T X[:, seg_s] - beta_s  * Y[:, seg_s]   alpha_s = sum_{m>=s} rx_m^2 rowsum(G_m * cos_m)

Work, with ``top`` the largest active dim of a layer (FLOPs of the tensor-core products)::

    forward  : 2 * L * R * C * top                     (one accumulation over [0, top) per tile)
    backward : 2 launches x 2 * (2 * L * R * C * top)  (recompute S + one product per launch) = 4x forward

The backward kernel is launched twice (dX over row blocks, dY over column blocks). For each
[rows, cols] tile it walks k upwards over [0, top) in exactly the forward's order (same chunks,
same BLOCK_D), so the recomputed logits are bit-identical to the forward's and the probabilities
``exp2((z - max) - logsum)`` are exact up to fp32 rounding; at each active boundary it writes
``W_m`` to a per-program tile slot. Then it walks the segments downwards, summing the slots into
``H`` on chip (no subtraction, no cancellation) and accumulating ``H Y[:, seg]`` into the owner
block's fp32 work rows. Nothing of size ``R x C`` reaches memory; the grid is persistent and the
number of programs is bounded so that all scratch (work rows + tile slots) stays under
``SCRATCH_BUDGET`` bytes (below the H100's 50 MB L2). Each block has one owner program: no
atomics, results are deterministic.

When every dim is a multiple of BLOCK_D (``ALIGNED``), the forward's accumulation is one flat k-loop
over [0, top) with the epilogue inside it at each boundary (`_forward_tile`), and so are the plain
backward's recompute and its downward product loop: the software pipeline keeps loading the next chunks
across a boundary instead of draining and refilling at every segment (dims 32..768 in 32-wide chunks
have segments of 1, 1, 2, 4, 8 and 8 chunks). The backward with rules keeps a loop per segment (see
``FLAT_K``); other dims take the per-segment loops with masked chunks.

Row statistics are kept relative to the row maximum (``max`` and ``log2 sum exp2(z - max)``
stored separately), so a large ``scale`` costs no ulp(scale) error in the probabilities. ``scale``
is a fixed maximum (``|cos| <= 1``) while ``exp2(-2 * scale * log2(e))`` stays a normal fp32
number; above that the forward keeps a running maximum.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from m2d_kernels.backends.torch_prefix import SECOND_DERIVATIVE_ERROR, device_table, inverse_prefix_norms, prefix_norms
from m2d_kernels.rules import PLAIN, Rules, check_rules

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# exp2 of anything down to -FIXED_MAX_LIMIT is a normal fp32 number (2^-126 is the smallest).
FIXED_MAX_LIMIT = 120.0
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The pass applies rules.triangle and rules.column_statistics (backends/__init__.py); column statistics only
# where `shares_tiles(similarity, scale)` (a fixed maximum), which the composer asks per call.
SHARED_TILES = True
# Bytes of fp32 scratch all backward programs may hold together: stays resident in L2 (50 MB on H100).
SCRATCH_BUDGET = 32 << 20
# Opt-in autotuning; otherwise `_heuristic_config` picks the tile without a single trial run.
AUTOTUNE_ENV = "M2D_TRITON_AUTOTUNE"
# Under the interpreter only: the fp32 product to emulate (default "tf32x3-emulated", what the GPU runs).
INTERPRET_FP32_ENV = "M2D_TRITON_INTERPRET_FP32"
# The rules of a pass (m2d_kernels.rules) as compile-time flags of both kernels; all off = the plain pass.
RULE_FLAGS = ("SIMILARITY_DOT", "EXCLUDE_GROUP", "PENALTY_MODE", "GUIDED", "TEACHER", "TRIANGLE", "COLUMN_STATS")
PENALTY_MODES = {None: 0, "in_batch_negatives": 1, "hard_negatives": 2, "all_negatives": 3}
BLOCK_DG = 32  # chunk of the guide embeddings' width in the per-tile guide product


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------------------

# (BLOCK_R, BLOCK_C, num_warps, num_stages). Forward and backward share BLOCK_D (a function of
# the dims, see `_block_d`) so that the backward's recompute adds the same chunks in the same order.
# Heuristic = the first config the problem fills; the first ones compile for sm_90 without spills
# (benchmarks/sm90_report.py), the rest are there for the opt-in autotuner.
FORWARD_CONFIGS = ((64, 128, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 128, 8, 3),
                   (128, 64, 4, 3), (128, 128, 8, 4))
BACKWARD_CONFIGS = ((64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3),
                    (64, 128, 8, 3), (128, 128, 8, 3))
# tf32x3 holds hi and lo halves of both operands in registers: fp32's spill-free forward tile is narrower,
# its k-chunk is 16 (`_block_d`), and its dY launch streams 32-row tiles (sm_90, worked example: dX 0 B and
# dY 0 B of spill; with 32-wide k-chunks and 64x64 tiles they spilled 40 and 56 B, with 16-wide chunks
# and a 64x64 dY, 8 B).
FP32_FORWARD_CONFIG = (64, 64, 4, 3)
FP32_BACKWARD_CONFIGS = {"backward_dX": (64, 64, 8, 2), "backward_dY": (32, 64, 8, 2)}
# With rules on (mask, penalty and teacher tiles live across the dim loop) the forward spills at the plain
# tiles (up to 1 KB per thread at 64x128/4w); 64x64 over 8 warps is spill-free for each rule and for
# dot+penalty+guided in bf16, 48 B (bf16) and 40 B (fp32) with all four of exclude+penalty+guided+teacher
# (Triton 3.6). What every launched specialisation spills today: benchmarks/results/sm90_report.json.
RULES_FORWARD_CONFIG = (64, 64, 8, 3)
# The shared-tile passes of the joint directions (rules.triangle / column_statistics: query_to_doc with
# doc_to_query's column sums, the triangles with and without own-group exclusion) keep column statistics
# live in the backward: at the plain tiles they spilled up to 352 B (bf16 dY) and 536 B (fp32 dY). These
# are spill-free for each of those three rule sets on Triton 3.6, the GPU machine's (sm90_report.py, the
# worked example's shared-tile cases), except fp32 dY, whose 32-row tile spills 8 B with the triangle and 64x32 16 B
# without: the triangle takes 64x32. fp32 dX streams 32-wide column tiles over 4 warps: 32x64/8 spilled 16 B
# once the gradient stores took int32 offsets (which made the other passes' backward spill less). Triton 3.9
# allocates differently: some spill 8-16 B there.
SHARED_TILES_BACKWARD_CONFIGS = {
    torch.bfloat16: {"backward_dX": (64, 32, 4, 2), "backward_dY": (32, 128, 8, 2)},
    torch.float32: {"backward_dX": (32, 32, 4, 2), "backward_dY": (32, 64, 8, 2)},
}
SHARED_TILES_FP32_TRIANGLE_DY = (64, 32, 8, 2)
INTERPRETER_CONFIG = (16, 16, 1, 1)  # tl.dot needs tiles >= 16; the CPU interpreter wants few ops


def _heuristic_config(kind: str, dtype: torch.dtype, n_rows: int, n_cols: int, plain: bool = True,
                      triangle: bool = False, column_statistics: bool = False) -> tuple[int, int, int, int]:
    """The config a launch (``kind``: forward, backward_dX or backward_dY) uses when autotuning is off: the
    first of the kind's list that the problem fills (small batches take the 64-wide tiles); fp32 takes
    FP32_FORWARD_CONFIG / FP32_BACKWARD_CONFIGS, a forward with rules (``plain=False``) RULES_FORWARD_CONFIG,
    a backward with ``triangle`` or ``column_statistics`` (the shared tiles) SHARED_TILES_BACKWARD_CONFIGS."""
    if _interpreting():
        return INTERPRETER_CONFIG
    if kind == "forward" and not plain:
        return RULES_FORWARD_CONFIG
    if kind != "forward" and (triangle or column_statistics):
        shared_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16  # fp16 tiles as bf16's
        if shared_dtype == torch.float32 and kind == "backward_dY" and triangle:
            return SHARED_TILES_FP32_TRIANGLE_DY
        return SHARED_TILES_BACKWARD_CONFIGS[shared_dtype][kind]
    if kind == "forward" and dtype == torch.float32:
        return FP32_FORWARD_CONFIG
    if kind in FP32_BACKWARD_CONFIGS and dtype == torch.float32:
        return FP32_BACKWARD_CONFIGS[kind]
    for config in FORWARD_CONFIGS if kind == "forward" else BACKWARD_CONFIGS:
        classes = _size_classes(n_rows, n_cols)
        if config[0] <= max(64, classes["R_CLASS"]) and config[1] <= max(64, classes["C_CLASS"]):
            return config
    return (64, 64, 4, 3)


def _triton_configs(configs):
    return [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w, num_stages=s) for r, c, w, s in configs]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the problem's size class (they would only mask)."""
    kept = [c for c in configs if c.kwargs["BLOCK_R"] <= max(64, named_args["R_CLASS"])
            and c.kwargs["BLOCK_C"] <= max(64, named_args["C_CLASS"])]
    return kept or configs[:1]


def _autotuned(kernel, configs, key, reset_to_zero=None):
    """At most 12 configs, keyed by size class (next power of two of R and C, so a smaller last
    batch reuses the choice), the choice cached on disk by Triton (``cache_results``). ``reset_to_zero``:
    the outputs a kernel adds to (atomics), zeroed before every trial run and before the chosen one."""
    return triton.autotune(configs=_triton_configs(configs), key=list(key), cache_results=True,
                           reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


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
    rows_ptr, cols_ptr, positives_ptr, bounds_ptr, active_ptr, n_seg_ptr, inv_rows_ptr, inv_cols_ptr,
    max_ptr, logsum_ptr, row_loss_ptr, dscale_ptr, row_group_ptr, guide_rows_ptr, guide_cols_ptr, guide_thr_ptr,
    teacher_sum_ptr, col_sum_ptr, L, R, C, D, DG, G, K, scale_log2, penalty_log2, R_CLASS, C_CLASS,
    M: tl.constexpr, M_PAD: tl.constexpr, FIXED_MAX: tl.constexpr, ALIGNED: tl.constexpr,
    SCALE_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    SIMILARITY_DOT: tl.constexpr, EXCLUDE_GROUP: tl.constexpr, PENALTY_MODE: tl.constexpr, GUIDED: tl.constexpr,
    TEACHER: tl.constexpr, TRIANGLE: tl.constexpr, COLUMN_STATS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
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
    rows_ptr, cols_ptr, positives_ptr, bounds_ptr, active_ptr, n_seg_ptr, inv_rows_ptr, inv_cols_ptr,
    norm_ptr, max_ptr, logsum_ptr, coef_ptr, grad_ptr, work_ptr, slots_ptr, row_group_ptr, guide_rows_ptr,
    guide_cols_ptr, guide_thr_ptr, distill_ptr, col_offset_ptr, col_logsum_ptr, L, R, C, D, DG, G, K, scale_log2,
    penalty_log2, R_CLASS, C_CLASS,
    M: tl.constexpr, M_PAD: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, FOR_COLS: tl.constexpr,
    SIMILARITY_DOT: tl.constexpr, EXCLUDE_GROUP: tl.constexpr, PENALTY_MODE: tl.constexpr, GUIDED: tl.constexpr,
    TEACHER: tl.constexpr, TRIANGLE: tl.constexpr, COLUMN_STATS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
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
    # Flat k-loops (as the forward's) for the plain pass only. With rules the mask, column-statistic and teacher
    # tiles stay live across the loops: flat, the shared-tile passes spilled 8-64 B at their tiles, where the
    # segment loops spill nothing, and penalty / teacher spilled more than with segment loops (sm_90, Triton 3.6).
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


_m2d_fwd_kernel = triton.jit(_m2d_fwd_kernel)
_m2d_bwd_kernel = triton.jit(_m2d_bwd_kernel)
# Autotuned variants of the same kernels (opt-in). The kernels overwrite their outputs (the backward
# zeroes its work rows first) except the forward's column sums, atomic adds of every row block: those are
# zeroed before each of the autotuner's runs.
_m2d_fwd_tuned = _autotuned(_m2d_fwd_kernel, FORWARD_CONFIGS,
                            ("R_CLASS", "C_CLASS", "D", "M", "FIXED_MAX", "ALIGNED", "SCALE_GRAD", "BLOCK_D",
                             *RULE_FLAGS), reset_to_zero=["col_sum_ptr"])
_m2d_bwd_tuned = _autotuned(_m2d_bwd_kernel, BACKWARD_CONFIGS,
                            ("R_CLASS", "C_CLASS", "D", "M", "ALIGNED", "FOR_COLS", "BLOCK_D", *RULE_FLAGS))


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _segment_tables(dims: tuple[int, ...], active: tuple[bool, ...], device: torch.device):
    """Segment bounds [M + 1], active flags [L, M] and per-layer segment counts (up to the last
    active dim), cached so that a training step copies nothing from the host (each copy would sync)."""
    n_dims = len(dims)
    rows = [active[i:i + n_dims] for i in range(0, len(active), n_dims)]
    bounds = torch.tensor((0,) + dims, dtype=torch.int32, device=device)
    flags = torch.tensor(rows, dtype=torch.int32, device=device)
    last_active = [max((m + 1 for m, on in enumerate(row) if on), default=0) for row in rows]
    return bounds, flags, torch.tensor(last_active, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    """SMs of the GPU; the interpreter runs programs one after another, two exercise the persistent loop."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _block_d(dims, n_features: int, dtype: torch.dtype | None = None) -> tuple[int, bool]:
    """(BLOCK_D, ALIGNED): the widest chunk of 64, 32 or 16 that divides every dim, so that no chunk
    straddles a boundary and the loads need no k mask; 32 with masks when the dims are not multiples
    of 16 (or the rows' stride D is not). fp32 (tf32x3: hi and lo halves of both operands live in
    registers) always takes 16, which keeps its backward spill-free on sm_90."""
    common = math.gcd(*dims)
    fp32 = dtype == torch.float32
    for block in (16,) if fp32 else (64, 32, 16):
        if common % block == 0 and n_features % 16 == 0:
            return block, True
    return (16 if fp32 else 32), False


def _kernel_options(x: torch.Tensor, dims, scale: float) -> dict:
    block_d, aligned = _block_d(dims, x.shape[-1], x.dtype)
    return {
        "M": len(dims),
        "M_PAD": max(2, triton.next_power_of_2(len(dims))),
        "ALIGNED": aligned,
        "BLOCK_D": block_d,
        # fp32 inputs run on tensor cores as three tf32 products (hi*hi + hi*lo + lo*hi): about fp32's
        # accuracy at a third of tf32's rate, instead of FFMA without tensor cores. The interpreter emulates them.
        "DOT_PRECISION": _fp32_precision() if x.dtype == torch.float32 else "tf32",
        # The interpreter's tl.dot misreads bfloat16 tiles: multiply in fp32 there (see _mma_operand).
        "DOT_IN_FP32": x.dtype == torch.bfloat16 and _interpreting(),
    }


def _fp32_precision() -> str:
    """The tl.dot precision of fp32 inputs: tf32x3 on the GPU; under the interpreter its emulation, or what
    M2D_TRITON_INTERPRET_FP32 names ("ieee", "tf32-emulated": the error comparison of benchmarks/tf32_error.py)."""
    if not _interpreting():
        return "tf32x3"
    precision = os.environ.get(INTERPRET_FP32_ENV, "tf32x3-emulated")
    if precision not in ("tf32x3-emulated", "tf32-emulated", "ieee"):
        raise ValueError(f"{INTERPRET_FP32_ENV}={precision!r}: expected tf32x3-emulated, tf32-emulated or ieee")
    return precision


def _size_classes(n_rows: int, n_cols: int) -> dict:
    return {"R_CLASS": triton.next_power_of_2(n_rows), "C_CLASS": triton.next_power_of_2(n_cols)}


def _tile_kwargs(kind, x, n_rows, n_cols, rules=PLAIN):
    """Launch meta-parameters when autotuning is off (None when on: the autotuner chooses)."""
    if os.environ.get(AUTOTUNE_ENV) == "1" and not _interpreting():
        return None
    block_r, block_c, warps, stages = _heuristic_config(kind, x.dtype, n_rows, n_cols, rules.is_plain, rules.triangle,
                                                        rules.column_statistics > 0)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": warps, "num_stages": stages}


def _patch_interpreter_loop_bounds() -> None:
    """Triton 3.6's CPU interpreter turns a run-time loop bound into an int with ``int(array)`` on a
    one-element array, which NumPy >= 2.4 rejects; make it take the element instead. Only called
    when interpreting, idempotent."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "m2d_patched", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.m2d_patched = True
    interpreter._patch_lang_tensor = patched


def _on_device(device: torch.device):
    """Launches on the tensors' GPU, whatever the current one is (DDP-style per-rank devices)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# The kernels index a layer's rows with int32 offsets (row * D): past 2^31 elements per layer they wrap.
MAX_LAYER_ELEMENTS = 2**31 - 1


def _operand(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` contiguous, 16-byte aligned (an odd storage offset would compile another, untested variant
    without the pointers' divisibility) and small enough for the kernels' int32 offsets."""
    n_rows, n_features = x.shape[-2], x.shape[-1]
    if n_rows * n_features > MAX_LAYER_ELEMENTS:
        raise ValueError(f"{name}: the triton backend indexes a layer with int32 offsets, so rows x D must be below "
                         f"2^31, got {n_rows} x {n_features}; split the batch or use backend='torch'")
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"queries/docs: the triton backend supports float16, bfloat16 and float32, got {x.dtype}")


def _positives(positives: torch.Tensor) -> torch.Tensor:
    """int32 and contiguous whatever the caller's strides (an expanded or strided index is read
    element by element at offset i by the kernels)."""
    return positives.to(torch.int32, memory_format=torch.contiguous_format).contiguous()


def _rule_arguments(rules: Rules, rows: torch.Tensor, distill_coef=None, col_offset=None, col_log_sum=None):
    """(pointer tensors, scalars, flags) of the rules for either kernel: row groups (int32), guide
    embeddings and thresholds (fp32), per-pair distillation coefficients, the columns' statistics (natural
    log in, log2 units out); unused pointers get a dummy."""
    dummy = rows.new_zeros(1, dtype=torch.float32)
    group = dummy.int()
    if rules.exclude_own_group or rules.penalty is not None:
        group = rules.row_group.to(device=rows.device, dtype=torch.int32).contiguous()
    guide_rows = guide_cols = threshold = dummy
    if rules.guided:
        guide_rows, guide_cols, threshold = (t.to(device=rows.device, dtype=torch.float32).contiguous()
                                             for t in (rules.guide_rows, rules.guide_cols, rules.guide_threshold))
    distill = dummy if distill_coef is None else distill_coef.float().contiguous()
    # fp64 -> log2 units -> fp32: gives back the forward's fp32 values (as for the rows' statistics).
    col_offset, col_log_sum = (dummy if t is None else (t.to(rows.device) * LOG2E).float().contiguous()
                               for t in (col_offset, col_log_sum))
    pointers = {"row_group_ptr": group, "guide_rows_ptr": guide_rows, "guide_cols_ptr": guide_cols,
                "guide_thr_ptr": threshold, "distill_ptr": distill, "col_offset_ptr": col_offset,
                "col_logsum_ptr": col_log_sum}
    scalars = {"DG": guide_rows.shape[-1] if rules.guided else 0, "G": rules.group_period,
               "K": rules.column_statistics,
               "penalty_log2": rules.penalty_strength * LOG2E if rules.penalty is not None else 0.0}
    flags = {"SIMILARITY_DOT": rules.similarity == "dot", "EXCLUDE_GROUP": rules.exclude_own_group,
             "PENALTY_MODE": PENALTY_MODES[rules.penalty], "GUIDED": rules.guided, "TRIANGLE": rules.triangle,
             "COLUMN_STATS": rules.column_statistics > 0, "BLOCK_DG": BLOCK_DG}
    return pointers, scalars, flags


def _launch_forward(rows, cols, positives, dims, active, scale, scale_grad, rules=PLAIN, norms=None):
    """Row statistics of rows against cols under ``rules`` (flat ``active``): the row maxima (or fixed
    maximum), log2 sums, row losses [L, R, M] (log2 units, fp32), d row loss / d scale (or the loss table
    itself without ``scale_grad``), the inverse-norm / norm-factor tables, with ``rules.teacher`` the
    teacher sums (log2 units; else None) and with ``rules.column_statistics = K`` the columns' sums
    ``sum_i exp(z_col(i, j) - scale)`` ``[L, K, M]`` (fp32; else None)."""
    if rows.device.type == "cpu":
        _patch_interpreter_loop_bounds()
    rows, cols = _operand(rows, "queries (rows)"), _operand(cols, "docs (columns)")
    n_layers, n_rows, n_features = rows.shape
    n_cols = cols.shape[1]
    bounds, flags, n_seg = _segment_tables(tuple(dims), tuple(active), rows.device)
    row_norms, col_norms = norms or (None, None)  # the pass API's precomputed tables
    inv_rows, norm_rows = prefix_norms(rows, tuple(dims), torch.float32, row_norms)
    inv_cols, norm_cols = prefix_norms(cols, tuple(dims), torch.float32, col_norms)
    # The kernel writes every entry of these tables.
    row_max, row_logsum, row_loss = (rows.new_empty(n_layers, n_rows, len(dims), dtype=torch.float32)
                                     for _ in range(3))
    row_dscale = torch.empty_like(row_loss) if scale_grad else row_loss  # not written without SCALE_GRAD
    teacher_sum = torch.empty_like(row_loss) if rules.teacher else row_loss  # not written without TEACHER
    # Added to by every row block (atomics): starts at 0. Not touched without COLUMN_STATS.
    col_sum = (rows.new_zeros(n_layers, rules.column_statistics, len(dims), dtype=torch.float32)
               if rules.column_statistics else row_loss)
    scale_log2 = scale * LOG2E
    pointers, scalars, rule_flags = _rule_arguments(rules, rows)
    args = (rows, cols, _positives(positives), bounds, flags, n_seg, inv_rows, inv_cols, row_max, row_logsum,
            row_loss, row_dscale, pointers["row_group_ptr"], pointers["guide_rows_ptr"], pointers["guide_cols_ptr"],
            pointers["guide_thr_ptr"], teacher_sum, col_sum, n_layers, n_rows, n_cols, n_features, scalars["DG"],
            scalars["G"], scalars["K"], scale_log2, scalars["penalty_log2"])
    max_logit = rules.max_logit(scale)
    options = dict(_kernel_options(rows, dims, scale), **_size_classes(n_rows, n_cols), **rule_flags,
                   FIXED_MAX=max_logit is not None and 2 * max_logit * LOG2E <= FIXED_MAX_LIMIT,
                   SCALE_GRAD=scale_grad, TEACHER=rules.teacher)
    # With TEACHER one program walks every layer (the teacher tile is shared), else one per layer.
    layer_programs = 1 if rules.teacher else n_layers
    tiles = _tile_kwargs("forward", rows, n_rows, n_cols, rules)
    with _on_device(rows.device):
        if tiles is None:
            _m2d_fwd_tuned[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), layer_programs)](*args, **options)
        else:
            _m2d_fwd_kernel[(triton.cdiv(n_rows, tiles["BLOCK_R"]), layer_programs)](*args, **options, **tiles)
    return (row_max, row_logsum, row_loss, row_dscale, inv_rows, norm_rows, inv_cols, norm_cols,
            teacher_sum if rules.teacher else None, col_sum if rules.column_statistics else None)


@torch.library.custom_op("m2d_kernels::infonce_forward", mutates_args=())
def m2d_forward(
    rows: torch.Tensor, cols: torch.Tensor, positives: torch.Tensor, dims: list[int], active: list[bool], scale: float,
    scale_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Per-pair losses ``[L, M]`` (input dtype), d loss / d scale ``[L, M]`` fp32 (empty unless
    ``scale_grad``), and what backward needs: row maxima and log2 sums ``[L, R, M]`` (log2 units)
    and the inverse-norm / norm-factor tables of rows and columns."""
    row_max, row_logsum, row_loss, row_dscale, inv_rows, norm_rows, inv_cols, norm_cols, _, _ = _launch_forward(
        rows, cols, positives, dims, active, scale, scale_grad)
    _, flags, _ = _segment_tables(tuple(dims), tuple(active), rows.device)
    active_pairs = flags.bool()
    losses = torch.where(active_pairs, row_loss.mean(1) * LN2, 0.0).to(rows.dtype)
    dscale = torch.where(active_pairs, row_dscale.mean(1), 0.0) if scale_grad else row_loss.new_empty(0)
    return losses, dscale, row_max, row_logsum, inv_rows, norm_rows, inv_cols, norm_cols


@m2d_forward.register_fake
def _(rows, cols, positives, dims, active, scale, scale_grad):
    n_layers, n_rows, _ = rows.shape
    table = rows.new_empty(n_layers, n_rows, len(dims), dtype=torch.float32)
    col_table = cols.new_empty(n_layers, cols.shape[1], len(dims), dtype=torch.float32)
    losses = rows.new_empty(n_layers, len(dims))
    dscale = rows.new_empty((n_layers, len(dims)) if scale_grad else (0,), dtype=torch.float32)
    return losses, dscale, table, table.clone(), table.clone(), table.clone(), col_table, col_table.clone()


def _launch_backward(coef, rows, cols, positives, row_max, row_logsum, inv_rows, norm_rows, inv_cols, norm_cols,
                     dims, active, scale, rules=PLAIN, distill_coef=None, col_offset=None, col_log_sum=None):
    """Gradients with respect to rows and cols for the fp32 per-pair coefficients ``coef [L, M]`` of
    ``p - onehot`` (+ ``p_col`` on the first ``rules.column_statistics`` columns, with the natural-log
    ``col_offset`` / ``col_log_sum``) and, when given, ``distill_coef`` of ``p - p_teacher``, both per row
    and times ``scale`` (d / d s = scale * d / d z)."""
    if rows.device.type == "cpu":
        _patch_interpreter_loop_bounds()
    rows, cols = _operand(rows, "queries (rows)"), _operand(cols, "docs (columns)")
    n_layers, n_rows, n_features = rows.shape
    n_cols = cols.shape[1]
    bounds, flags, n_seg = _segment_tables(tuple(dims), tuple(active), rows.device)
    positives = _positives(positives)
    pointers, scalars, rule_flags = _rule_arguments(rules, rows, distill_coef, col_offset, col_log_sum)
    options = dict(_kernel_options(rows, dims, scale), **_size_classes(n_rows, n_cols), **rule_flags,
                   TEACHER=distill_coef is not None)
    launch_tiles = {kind: _tile_kwargs(kind, rows, n_rows, n_cols, rules) for kind in ("backward_dX", "backward_dY")}
    configs = ([config[:2] for config in BACKWARD_CONFIGS] if launch_tiles["backward_dX"] is None
               else [(tiles["BLOCK_R"], tiles["BLOCK_C"]) for tiles in launch_tiles.values()])
    sms = _multiprocessors(rows.device)
    # Each config's programs hold their own work rows and tile slots, within SCRATCH_BUDGET per launch. The
    # buffers fit the largest need of each (work rows of one config, slots of another when dX and dY tiles
    # differ), so the allocation is at most twice the budget; a launch touches only its own config's part.
    programs_of = {config: _backward_programs(*config, n_features, len(dims), sms) for config in configs}
    work = rows.new_empty(max(p * max(config) for config, p in programs_of.items()), n_features, dtype=torch.float32)
    slots = rows.new_empty(max(1, max(p * (len(dims) - 1) * config[0] * config[1]
                                      for config, p in programs_of.items())), dtype=torch.float32)
    grads = []
    for for_cols, n_own, block, norm in ((False, n_rows, "BLOCK_R", norm_rows), (True, n_cols, "BLOCK_C", norm_cols)):
        tiles = launch_tiles["backward_dY" if for_cols else "backward_dX"]
        grad = torch.empty_like(cols if for_cols else rows)
        args = (rows, cols, positives, bounds, flags, n_seg, inv_rows, inv_cols, norm, row_max, row_logsum, coef,
                grad, work, slots, *pointers.values(), n_layers, n_rows, n_cols, n_features, scalars["DG"],
                scalars["G"], scalars["K"], scale * LOG2E, scalars["penalty_log2"])
        with _on_device(rows.device):
            if tiles is None:
                def grid(meta, n_own=n_own, block=block):
                    programs = programs_of[(meta["BLOCK_R"], meta["BLOCK_C"])]
                    return (min(n_layers * triton.cdiv(n_own, meta[block]), programs),)
                _m2d_bwd_tuned[grid](*args, FOR_COLS=for_cols, **options)
            else:
                programs = programs_of[(tiles["BLOCK_R"], tiles["BLOCK_C"])]
                grid = (min(n_layers * triton.cdiv(n_own, tiles[block]), programs),)
                _m2d_bwd_kernel[grid](*args, FOR_COLS=for_cols, **options, **tiles)
        grads.append(grad)
    return grads[0], grads[1]


def _backward_programs(block_r: int, block_c: int, n_features: int, n_dims: int, sms: int) -> int:
    """Persistent backward programs of a tile: one per SM, fewer if their fp32 scratch (work rows of the
    owned block, ``n_dims - 1`` tile slots) would not stay in the L2 budget; at least one."""
    per_program = 4 * (max(block_r, block_c) * n_features + (n_dims - 1) * block_r * block_c)
    return max(1, min(sms, SCRATCH_BUDGET // per_program))


@torch.library.custom_op("m2d_kernels::infonce_backward", mutates_args=())
def m2d_backward(
    grad_losses: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, positives: torch.Tensor, row_max: torch.Tensor,
    row_logsum: torch.Tensor, inv_rows: torch.Tensor, norm_rows: torch.Tensor, inv_cols: torch.Tensor,
    norm_cols: torch.Tensor, dims: list[int], active: list[bool], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_losses * losses)`` with respect to rows and cols: two launches of
    4 * L * R * C * top FLOPs each."""
    coef = (grad_losses.float() * (scale / rows.shape[1])).contiguous()
    return _launch_backward(coef, rows, cols, positives, row_max, row_logsum, inv_rows,
                            norm_rows, inv_cols, norm_cols, dims, active, scale)


@m2d_backward.register_fake
def _(grad_losses, rows, cols, positives, row_max, row_logsum, inv_rows, norm_rows, inv_cols, norm_cols, dims, active,
      scale):
    return torch.empty_like(rows), torch.empty_like(cols)


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    rows, cols, positives, dims, active, scale, _ = inputs
    ctx.save_for_backward(rows, cols, positives, *output[2:])
    ctx.config = (dims, active, scale)


def _backward(ctx, grad_losses, *unused_grads):
    grad_rows, grad_cols = m2d_backward(grad_losses, *ctx.saved_tensors, *ctx.config)
    return grad_rows, grad_cols, None, None, None, None, None


def _no_double_backward(ctx, grad_rows, grad_cols):
    raise RuntimeError(SECOND_DERIVATIVE_ERROR)


m2d_forward.register_autograd(_backward, setup_context=_setup_context)
m2d_backward.register_autograd(_no_double_backward)


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------


def pair_losses(
    queries: torch.Tensor,
    docs: torch.Tensor,
    dims: tuple[int, ...],
    active: tuple[tuple[bool, ...], ...],
    scale: float,
    positive_index: torch.Tensor,
    symmetric: bool,
    scale_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-pair InfoNCE losses ``[L, M]`` (0 where a pair is inactive), in the input dtype; with
    ``scale_grad`` also ``d loss / d scale`` ``[L, M]`` (fp32, detached, 0 where inactive)."""
    _check_dtype(queries)
    dims, flat_active = list(dims), [on for row in active for on in row]
    losses, dscale = m2d_forward(queries, docs, positive_index, dims, flat_active, scale, scale_grad)[:2]
    if symmetric:
        # doc_to_query: the B positives are the rows, all queries the columns, query i the positive of row i.
        query_labels = torch.arange(queries.shape[1], device=queries.device)
        rows = docs.index_select(1, positive_index)
        reverse, reverse_dscale = m2d_forward(rows, queries, query_labels, dims, flat_active, scale, scale_grad)[:2]
        losses = (losses + reverse) / 2
        dscale = (dscale + reverse_dscale) / 2
    return (losses, dscale.detach()) if scale_grad else losses


# ---------------------------------------------------------------------------------------
# Pass API (backends/__init__.py): the custom ops above on one block of columns
# ---------------------------------------------------------------------------------------


def _positive_logits(rows, cols, dims, active, scale, positives, rules):
    """``[L, R, M]`` ``z(i, positives_i)`` under ``rules`` in float64 (the kernels keep the positive logit of
    a row to themselves): the penalty where the positive's column is penalised, -inf where it is excluded,
    0 where ``positives_i == -1`` or the pair is inactive. ``O(L * R * D)``."""
    from m2d_kernels.backends.torch_prefix import positive_logits

    if rules.similarity == "cos" and rules.penalty is None and not rules.exclude_own_group:
        return positive_logits(rows, cols, dims, active, scale, positives).double()
    column = positives.clamp_min(0)
    x, y = rows.double(), cols.index_select(1, column).double()
    bounds = (0,) + tuple(dims)
    logits = torch.stack([(x[..., a:b] * y[..., a:b]).sum(-1) for a, b in zip(bounds, bounds[1:])], -1).cumsum(-1)
    if rules.similarity == "cos":
        logits = logits * inverse_prefix_norms(x, tuple(dims), torch.float64)[0]
        logits = logits * inverse_prefix_norms(y, tuple(dims), torch.float64)[0]
    factor = torch.full_like(column, scale, dtype=torch.float64)
    if rules.penalty is not None or rules.exclude_own_group:
        group = rules.row_group.to(column.device)
        own = column % rules.group_period == group
        penalised = {None: torch.zeros_like(own), "in_batch_negatives": ~own,
                     "hard_negatives": own & (column >= rules.group_period),
                     "all_negatives": column != group}[rules.penalty]
        factor = torch.where(penalised, scale + rules.penalty_strength, factor)
        if rules.exclude_own_group:
            factor = torch.where(own, torch.inf, factor)  # -inf below: the positive itself is excluded
    logits = logits * factor[None, :, None]
    if rules.exclude_own_group:
        logits = torch.where(torch.isinf(factor)[None, :, None], -torch.inf, logits)
    keep = (positives >= 0)[None, :, None] & device_table(active, rows.device)[:, None, :]
    return torch.where(keep, logits, 0.0)


def shares_tiles(similarity: str, scale: float | None = None) -> bool:
    """Whether this backend's forward returns ``rules.column_statistics`` for ``similarity`` (and ``scale``,
    when given): the columns' sums are atomic adds relative to a fixed maximum, so cosine only, with
    ``exp(-2 * scale)`` a normal fp32 number (scale <= FIXED_MAX_LIMIT / (2 * log2(e)), about 41.6).
    ``SHARED_TILES`` says the rules exist at all; the composer asks this per call."""
    return similarity == "cos" and (scale is None or 2 * scale * LOG2E <= FIXED_MAX_LIMIT)


def _check_column_statistics(rules: Rules, scale: float) -> None:
    if not rules.column_statistics:
        return
    if rules.similarity != "cos":
        raise ValueError("rules.column_statistics needs similarity 'cos' on the triton backend (a fixed maximum "
                         f"for the columns' atomic sums), got similarity={rules.similarity!r}")
    if not shares_tiles(rules.similarity, scale):
        raise ValueError(f"rules.column_statistics needs scale <= {FIXED_MAX_LIMIT / (2 * LOG2E):.1f} on the triton "
                         f"backend (a fixed maximum whose exp(-2 * scale) stays a normal fp32 number), got "
                         f"scale={scale}")


def row_statistics(rows, cols, dims, active, scale, positives, rules=PLAIN, norms=None):
    """Pass API: ``(offset, log_sum, positive_logit)`` ``[L, R, M]``, natural-log units, and with
    ``rules.teacher`` the teacher sums ``sum_j exp(z_T - offset_T) z_lm`` as a fourth tensor; with
    ``rules.column_statistics = K`` (``shares_tiles``: cosine, scale <= 41.6, else ValueError) the first K
    columns' ``(col_offset, col_log_sum)`` ``[L, K, M]`` as fourth and fifth, with the fixed offset ``scale``
    (0 and -inf for a column with every entry excluded, 0 and 0 for an inactive pair). The column sums are
    fp32 atomic adds of the row blocks: their last bits depend on the order the blocks ran in. The kernels
    keep log2 units: the tables are fp64 so that the round trip ln <-> log2 gives back the kernels' fp32
    values (an fp32 round trip costs ulp(scale * log2(e)) in every probability)."""
    _check_dtype(rows)
    check_rules(rules, rows.shape[1], cols.shape[1], active)
    _check_column_statistics(rules, scale)
    flat_active = [on for row in active for on in row]
    out = _launch_forward(rows, cols, positives, list(dims), flat_active, scale, False, rules, norms)
    positive = _positive_logits(rows, cols, dims, active, scale, positives, rules)
    stats = (out[0].double() * LN2, out[1].double() * LN2, positive)
    if rules.teacher:
        return stats + (out[-2].double() * LN2,)
    if rules.column_statistics:
        col_sum = out[-1].double()
        pair_active = _segment_tables(tuple(dims), tuple(flat_active), rows.device)[1].bool()[:, None, :]
        col_offset = torch.where(pair_active & (col_sum > 0), float(scale), 0.0)
        col_log_sum = torch.where(pair_active, col_sum.log(), 0.0)
        return stats + (col_offset, col_log_sum)
    return stats


def pass_gradients(rows, cols, dims, active, scale, positives, offset, log_sum, coef, rules=PLAIN,
                   distill_coef=None, col_offset=None, col_log_sum=None, norms=None):
    """Pass API: ``(d_rows, d_cols)`` in the input dtype with the given (combined) statistics; the
    teacher term when ``distill_coef`` is given; with ``rules.column_statistics = K`` also the first K
    columns' softmaxes with the given ``col_offset`` / ``col_log_sum`` ``[L, K, M]`` (any similarity and
    scale: the backward needs no fixed maximum)."""
    _check_dtype(rows)
    check_rules(rules, rows.shape[1], cols.shape[1], active, distill_coef is not None)
    if rules.column_statistics:
        expected = (len(active), rules.column_statistics, len(dims))
        if col_offset is None or col_log_sum is None:
            raise ValueError("col_offset and col_log_sum are required with rules.column_statistics")
        if tuple(col_offset.shape) != expected or tuple(col_log_sum.shape) != expected:
            raise ValueError(f"col_offset and col_log_sum must have shape {expected} ([L, K, M]), got "
                             f"{tuple(col_offset.shape)} and {tuple(col_log_sum.shape)}")
    flat_active = [on for row in active for on in row]
    row_norms, col_norms = norms or (None, None)
    inv_rows, norm_rows = prefix_norms(rows, tuple(dims), torch.float32, row_norms)
    inv_cols, norm_cols = prefix_norms(cols, tuple(dims), torch.float32, col_norms)
    # The kernels' coefficients multiply d / d z per row loss by scale (d z / d s).
    distill = None if distill_coef is None else (distill_coef * scale).float()
    return _launch_backward((coef * scale).float(), rows, cols, positives, (offset * LOG2E).float().contiguous(),
                            (log_sum * LOG2E).float().contiguous(), inv_rows, norm_rows, inv_cols, norm_cols,
                            list(dims), flat_active, scale, rules, distill, col_offset, col_log_sum)
