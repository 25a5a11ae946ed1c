"""Backend ``triton``: fused kernels for all layers x all nested dims, one launch per pass.

Everything is phrased as one "rows vs columns" InfoNCE: ``rows`` ``[L, R, D]`` are scored
against ``cols`` ``[L, C, D]`` and row ``i``'s positive is column ``positives[i]``. The
query-to-doc direction is (queries, docs, positive_index); the doc-to-query direction of
``symmetric`` is the same computation with roles swapped (docs[positive_index], queries,
arange(B)), so it reuses these kernels instead of a copy.

Math (DESIGN.md section 1), per layer l, dim index m, segment ``seg_m = [d_{m-1}, d_m)``::

    S_m      = S_{m-1} + X[:, seg_m] Y[:, seg_m]^T          one fp32 accumulator over D
    cos_m    = diag(rx_m) S_m diag(ry_m)                     rx_m = 1 / max(|x[:d_m]|, eps)
    loss_lm  = mean_i [ logsumexp_j(scale * cos_m(i, j)) - scale * cos_m(i, p(i)) ]

Backward, ``G_m = coef_lm * (softmax_j(scale * cos_m) - onehot(p))`` with
``coef_lm = dL/dloss_lm * scale / R``, suffix sums over ``m >= s``::

    dX[:, seg_s] = H_s Y[:, seg_s]   - alpha_s * X[:, seg_s]   H_s = sum_{m>=s} diag(rx_m) G_m diag(ry_m)
    dY[:, seg_s] = H_s^T X[:, seg_s] - beta_s  * Y[:, seg_s]   alpha_s = sum_{m>=s} rx_m^2 rowsum(G_m * cos_m)

The backward is one kernel launched twice (dX over row blocks, dY over column blocks). For
each tile it walks the segments from the largest dim down: at each active boundary it
recomputes ``S_m`` and adds ``G_m`` to ``H``, then accumulates ``H Y[:, seg]`` into the owner
block's fp32 work rows. No ``R x C`` matrix is ever written to memory: the forward
keeps ``[L, R, M]`` statistics; the backward's grid is persistent (one program per SM), so its
fp32 scratch is ``programs x block x D`` whatever the batch, and each block is owned by one
program (no atomics).

``scale`` is a fixed log-sum-exp maximum (``|cos| <= 1``) while ``exp2(-2 * scale *
log2(e))`` stays a normal fp32 number; above that the forward keeps a running maximum.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from m2d_kernels.backends.torch_prefix import inverse_prefix_norms

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# exp2 of anything down to -FIXED_MAX_LIMIT is a normal fp32 number (2^-126 is the smallest).
FIXED_MAX_LIMIT = 120.0
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)"


def _configs(block_rows, block_cols, block_d, warps, stages):
    return [
        triton.Config({"BLOCK_R": r, "BLOCK_C": c, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for r in block_rows for c in block_cols for d in block_d for w in warps for s in stages
    ]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _autotune_configs():
    # The interpreter runs on the CPU: one small config (tl.dot needs tiles >= 16).
    if _interpreting():
        return _configs((16,), (16,), (16,), (1,), (1,))
    return _configs((64, 128), (64, 128), (32, 64), (4, 8), (2, 3))


def _largest_block() -> int:
    return max(max(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"]) for c in _autotune_configs())


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the problem needs and 128 x 128 tiles on 4 warps (register spills)."""
    row_limit = max(64, triton.next_power_of_2(named_args["R"]))
    col_limit = max(64, triton.next_power_of_2(named_args["C"]))
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_R"] <= row_limit and c.kwargs["BLOCK_C"] <= col_limit
        and not (c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_C"] >= 128 * 128 and c.num_warps < 8)
    ]
    return kept or configs[:1]


def _autotune(kernel_fn, key=("R", "C", "D", "M", "FIXED_MAX")):
    return triton.autotune(
        configs=_autotune_configs(),
        key=list(key),
        prune_configs_by={"early_config_prune": _prune_configs},
    )(triton.jit(kernel_fn))


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_operand(ptrs, mask, DOT_IN_FP32: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_IN_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _accumulate_segment(acc, x_ptrs, y_ptrs, x_mask, y_mask, lo, hi,
                        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc += X[:, lo:hi] Y[:, lo:hi]^T, masked at the segment edge (dims need not align)."""
    for k0 in range(lo, hi, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        k_mask = k < hi
        x = _load_operand(x_ptrs + k[None, :], x_mask[:, None] & k_mask[None, :], DOT_IN_FP32)
        y = _load_operand(y_ptrs + k[None, :], y_mask[:, None] & k_mask[None, :], DOT_IN_FP32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _coefficient_tile(acc, rx, ry, row_lse, onehot, valid, coef, scale_log2):
    """G = coef * (softmax - onehot) and cos of one (layer, dim) pair on an [R, C] tile
    (row_lse in log2 units, like every logit in these kernels)."""
    cos = acc * rx[:, None] * ry[None, :]
    prob = tl.exp2(cos * scale_log2 - row_lse[:, None])
    grad_cos = tl.where(valid, coef * (prob - onehot), 0.0)
    return grad_cos, cos


@triton.jit
def _column(table, m, m_ids):
    """Column m of a [rows, M_PAD] register table."""
    return tl.sum(tl.where(m_ids[None, :] == m, table, 0.0), axis=1)


@triton.jit
def _zero_columns(ptrs, mask, lo, hi, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """ptrs[:, lo:hi] = 0 for the rows in mask."""
    for k0 in range(lo, hi, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        tl.store(ptrs + k[None, :], tl.zeros([BLOCK, BLOCK_D], tl.float32), mask=mask[:, None] & (k < hi)[None, :])


@triton.jit
def _backward_tile(
    x_ptrs, y_ptrs, work_ptrs, r, c, r_mask, c_mask, row_pos, norm_sums, layer, n_seg,
    bounds_ptr, active_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr, lse_ptr, coef_ptr, R, C, scale_log2,
    M: tl.constexpr, M_PAD: tl.constexpr, FOR_COLS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One [rows, cols] tile of the backward: walk the segments from the largest dim down; at each
    active boundary recompute S_m over [0, d_m) and add G_m to the suffix sum H, then accumulate
    H Y[:, seg_m] (rows) or H^T X[:, seg_m] (cols) into the owner's fp32 work rows. Recomputing
    S_m (rather than subtracting segments from S_M) costs sum(active dims) / D products instead of
    one but avoids the cancellation that small leading dims would suffer.
    Returns norm_sums + norm * sum(G_m * cos_m) along the owner's axis, per dim."""
    m_ids = tl.arange(0, M_PAD)
    valid = r_mask[:, None] & c_mask[None, :]
    onehot = (c[None, :] == row_pos[:, None]).to(tl.float32)
    h = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for step in range(0, n_seg):
        m = n_seg - 1 - step
        lo = tl.load(bounds_ptr + m)
        hi = tl.load(bounds_ptr + m + 1)
        if tl.load(active_ptr + layer * M + m) != 0:
            acc = _accumulate_segment(tl.zeros([BLOCK_R, BLOCK_C], tl.float32), x_ptrs, y_ptrs, r_mask, c_mask,
                                      0, hi, BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
            rx = tl.load(inv_rows_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
            ry = tl.load(inv_cols_ptr + (layer * C + c) * M + m, mask=c_mask, other=0.0)
            row_lse = tl.load(lse_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
            coef = tl.load(coef_ptr + layer * M + m)
            grad_cos, cos = _coefficient_tile(acc, rx, ry, row_lse, onehot, valid, coef, scale_log2)
            if FOR_COLS:
                norm = tl.load(norm_ptr + (layer * C + c) * M + m, mask=c_mask, other=0.0)
                norm_sum = norm * tl.sum(grad_cos * cos, axis=0)
            else:
                norm = tl.load(norm_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
                norm_sum = norm * tl.sum(grad_cos * cos, axis=1)
            norm_sums += tl.where(m_ids[None, :] == m, norm_sum[:, None], 0.0)
            h += grad_cos * rx[:, None] * ry[None, :]
        for k0 in range(lo, hi, BLOCK_D):
            k = k0 + tl.arange(0, BLOCK_D)
            k_mask = k < hi
            if FOR_COLS:
                io_mask = c_mask[:, None] & k_mask[None, :]
                x = _load_operand(x_ptrs + k[None, :], r_mask[:, None] & k_mask[None, :], DOT_IN_FP32)
                grad = tl.load(work_ptrs + k[None, :], mask=io_mask, other=0.0)
                grad = tl.dot(tl.trans(h).to(x.dtype), x, grad, input_precision=DOT_PRECISION)
            else:
                io_mask = r_mask[:, None] & k_mask[None, :]
                y = _load_operand(y_ptrs + k[None, :], c_mask[:, None] & k_mask[None, :], DOT_IN_FP32)
                grad = tl.load(work_ptrs + k[None, :], mask=io_mask, other=0.0)
                grad = tl.dot(h.to(y.dtype), y, grad, input_precision=DOT_PRECISION)
            tl.store(work_ptrs + k[None, :], grad, mask=io_mask)
    return norm_sums


@triton.jit
def _store_gradient(grad_ptrs, work_ptrs, own_ptrs, mask, norm_sums, bounds_ptr, n_seg, top, D,
                    BLOCK: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad[:, seg_s] = work[:, seg_s] - (sum_{m >= s} norm_sums[:, m]) * own[:, seg_s] in the
    gradient's dtype, walking s downwards; zero beyond the largest active dim."""
    m_ids = tl.arange(0, M_PAD)
    suffix = tl.zeros([BLOCK], tl.float32)
    for step in range(0, n_seg):
        m = n_seg - 1 - step
        suffix += _column(norm_sums, m, m_ids)
        lo = tl.load(bounds_ptr + m)
        hi = tl.load(bounds_ptr + m + 1)
        for k0 in range(lo, hi, BLOCK_D):
            k = k0 + tl.arange(0, BLOCK_D)
            io_mask = mask[:, None] & (k < hi)[None, :]
            own = tl.load(own_ptrs + k[None, :], mask=io_mask, other=0.0).to(tl.float32)
            work = tl.load(work_ptrs + k[None, :], mask=io_mask, other=0.0)
            tl.store(grad_ptrs + k[None, :], work - suffix[:, None] * own, mask=io_mask)
    _zero_columns(grad_ptrs, mask, top, D, BLOCK, BLOCK_D)


def _m2d_fwd_kernel(
    rows_ptr, cols_ptr, positives_ptr, bounds_ptr, active_ptr, n_seg_ptr, inv_rows_ptr, inv_cols_ptr,
    lse_ptr, pos_logit_ptr, R, C, D, scale_log2,
    M: tl.constexpr, M_PAD: tl.constexpr, FIXED_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (row block, layer). Per row and active pair, in log2 units: log-sum-exp_j(scale cos) and
    scale cos(i, p(i)), from one accumulator over D with the (layer, dim) epilogue at every
    nested-dim boundary."""
    pid_r = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    n_seg = tl.load(n_seg_ptr + layer)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    row_pos = tl.load(positives_ptr + r, mask=r_mask, other=-1)
    m_ids = tl.arange(0, M_PAD)
    x_ptrs = rows_ptr + (layer * R + r)[:, None] * D
    stat_offsets = (layer * R + r)[:, None] * M + m_ids[None, :]
    stat_mask = r_mask[:, None] & (m_ids < M)[None, :]

    if FIXED_MAX:
        run_max = tl.zeros([BLOCK_R, M_PAD], tl.float32) + scale_log2
    else:
        run_max = tl.full([BLOCK_R, M_PAD], float("-inf"), tl.float32)
    # Inactive pairs start at 1 so that their (unused) log-sum-exp stays finite.
    inactive = tl.load(active_ptr + layer * M + m_ids, mask=m_ids < M, other=0) == 0
    run_sum = tl.zeros([BLOCK_R, M_PAD], tl.float32) + inactive.to(tl.float32)[None, :]
    pos_logit = tl.zeros([BLOCK_R, M_PAD], tl.float32)
    n_streamed = tl.where(n_seg > 0, C, 0)  # a layer without active pairs streams nothing
    for c0 in range(0, n_streamed, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        y_ptrs = cols_ptr + (layer * C + c)[:, None] * D
        is_pos = c[None, :] == row_pos[:, None]
        has_pos = tl.sum(is_pos.to(tl.int32)) > 0  # most tiles hold no positive: skip the extraction
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for m in range(0, n_seg):
            lo = tl.load(bounds_ptr + m)
            hi = tl.load(bounds_ptr + m + 1)
            acc = _accumulate_segment(acc, x_ptrs, y_ptrs, r_mask, c_mask, lo, hi, BLOCK_D, DOT_PRECISION, DOT_IN_FP32)
            if tl.load(active_ptr + layer * M + m) != 0:
                rx = tl.load(inv_rows_ptr + (layer * R + r) * M + m, mask=r_mask, other=0.0)
                ry = tl.load(inv_cols_ptr + (layer * C + c) * M + m, mask=c_mask, other=0.0)
                z = acc * (rx * scale_log2)[:, None] * ry[None, :]  # scale * cos in log2 units
                z = tl.where(c_mask[None, :], z, float("-inf"))
                is_m = m_ids[None, :] == m
                if has_pos:
                    hit = tl.sum(tl.where(is_pos, z, 0.0), axis=1)
                    pos_logit = tl.where(is_m, pos_logit + hit[:, None], pos_logit)
                if FIXED_MAX:
                    tile_sum = tl.sum(tl.exp2(z - scale_log2), axis=1)
                    run_sum = tl.where(is_m, run_sum + tile_sum[:, None], run_sum)
                else:
                    old_max = tl.max(tl.where(is_m, run_max, float("-inf")), axis=1)
                    new_max = tl.maximum(old_max, tl.max(z, axis=1))
                    new_sum = _column(run_sum, m, m_ids) * tl.exp2(old_max - new_max)
                    new_sum += tl.sum(tl.exp2(z - new_max[:, None]), axis=1)
                    run_max = tl.where(is_m, new_max[:, None], run_max)
                    run_sum = tl.where(is_m, new_sum[:, None], run_sum)
    tl.store(lse_ptr + stat_offsets, run_max + tl.log2(run_sum), mask=stat_mask)
    tl.store(pos_logit_ptr + stat_offsets, pos_logit, mask=stat_mask)


def _m2d_bwd_kernel(
    rows_ptr, cols_ptr, positives_ptr, bounds_ptr, active_ptr, n_seg_ptr, inv_rows_ptr, inv_cols_ptr,
    norm_ptr, lse_ptr, coef_ptr, grad_ptr, workspace_ptr, L, R, C, D, scale_log2,
    M: tl.constexpr, M_PAD: tl.constexpr, FIXED_MAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, FOR_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Persistent grid over work items (layer, owner block): dX of a row block streaming over column
    tiles, or (FOR_COLS) dY of a column block streaming over row tiles. Each program accumulates
    in its own fp32 work rows, so the scratch memory is (programs x block x D), not the gradient's
    size. norm_ptr is rx^2 (or ry^2) where the norm was not clamped to eps, else 0."""
    pid = tl.program_id(0)
    if FOR_COLS:
        n_blocks = tl.cdiv(C, BLOCK_C)
    else:
        n_blocks = tl.cdiv(R, BLOCK_R)
    for work in range(pid, L * n_blocks, tl.num_programs(0)):
        layer = (work // n_blocks).to(tl.int64)
        block = work % n_blocks
        n_seg = tl.load(n_seg_ptr + layer)
        top = tl.load(bounds_ptr + n_seg)
        if FOR_COLS:
            c = block * BLOCK_C + tl.arange(0, BLOCK_C)
            c_mask = c < C
            y_ptrs = cols_ptr + (layer * C + c)[:, None] * D
            work_ptrs = workspace_ptr + (pid * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[:, None] * D
            _zero_columns(work_ptrs, c_mask, 0, top, BLOCK_C, BLOCK_D)
            norm_sums = tl.zeros([BLOCK_C, M_PAD], tl.float32)
            if n_seg > 0:
                for r0 in range(0, R, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    r_mask = r < R
                    row_pos = tl.load(positives_ptr + r, mask=r_mask, other=-1)
                    x_ptrs = rows_ptr + (layer * R + r)[:, None] * D
                    norm_sums = _backward_tile(
                        x_ptrs, y_ptrs, work_ptrs, r, c, r_mask, c_mask, row_pos, norm_sums, layer, n_seg,
                        bounds_ptr, active_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr, lse_ptr, coef_ptr, R, C,
                        scale_log2, M, M_PAD, FOR_COLS, DOT_PRECISION, DOT_IN_FP32, BLOCK_R, BLOCK_C, BLOCK_D,
                    )
            _store_gradient(grad_ptr + (layer * C + c)[:, None] * D, work_ptrs, y_ptrs,
                            c_mask, norm_sums, bounds_ptr, n_seg, top, D, BLOCK_C, M_PAD, BLOCK_D)
        else:
            r = block * BLOCK_R + tl.arange(0, BLOCK_R)
            r_mask = r < R
            row_pos = tl.load(positives_ptr + r, mask=r_mask, other=-1)
            x_ptrs = rows_ptr + (layer * R + r)[:, None] * D
            work_ptrs = workspace_ptr + (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None] * D
            _zero_columns(work_ptrs, r_mask, 0, top, BLOCK_R, BLOCK_D)
            norm_sums = tl.zeros([BLOCK_R, M_PAD], tl.float32)
            if n_seg > 0:
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    c_mask = c < C
                    y_ptrs = cols_ptr + (layer * C + c)[:, None] * D
                    norm_sums = _backward_tile(
                        x_ptrs, y_ptrs, work_ptrs, r, c, r_mask, c_mask, row_pos, norm_sums, layer, n_seg,
                        bounds_ptr, active_ptr, inv_rows_ptr, inv_cols_ptr, norm_ptr, lse_ptr, coef_ptr, R, C,
                        scale_log2, M, M_PAD, FOR_COLS, DOT_PRECISION, DOT_IN_FP32, BLOCK_R, BLOCK_C, BLOCK_D,
                    )
            _store_gradient(grad_ptr + (layer * R + r)[:, None] * D, work_ptrs, x_ptrs,
                            r_mask, norm_sums, bounds_ptr, n_seg, top, D, BLOCK_R, M_PAD, BLOCK_D)


# Every kernel overwrites its outputs (the backward zeroes its work rows first), so autotuning's
# repeated runs are harmless.
_m2d_fwd_kernel = _autotune(_m2d_fwd_kernel)
_m2d_bwd_kernel = _autotune(_m2d_bwd_kernel, key=("R", "C", "D", "M", "FOR_COLS"))


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
def _resident_programs(device: torch.device) -> int:
    """Programs of the persistent backward grid: one per SM of the largest tile (two of 64-row
    tiles). The interpreter runs programs one after another; a few exercise the persistent loop."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _launch_options(x: torch.Tensor, dims, scale: float) -> dict:
    scale_log2 = scale * LOG2E
    return {
        "M": len(dims),
        "M_PAD": max(2, triton.next_power_of_2(len(dims))),
        "FIXED_MAX": 2 * scale_log2 <= FIXED_MAX_LIMIT,
        "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
        # The interpreter's tl.dot misreads bfloat16 tiles: upcast them there (the GPU keeps bf16 MMA).
        "DOT_IN_FP32": x.dtype == torch.bfloat16 and _interpreting(),
    }


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


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"queries/docs: the triton backend supports float16, bfloat16 and float32, got {x.dtype}")


@torch.library.custom_op("m2d_kernels::infonce_forward", mutates_args=())
def m2d_forward(
    rows: torch.Tensor, cols: torch.Tensor, positives: torch.Tensor, dims: list[int], active: list[bool], scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[L, M]`` (input dtype) and what backward needs: row log-sum-exp ``[L, R, M]``
    (log2 units)
    and the inverse-norm / norm-factor tables of rows and columns."""
    if rows.device.type == "cpu":
        _patch_interpreter_loop_bounds()
    rows, cols = rows.contiguous(), cols.contiguous()
    n_layers, n_rows, n_features = rows.shape
    n_cols = cols.shape[1]
    bounds, flags, n_seg = _segment_tables(tuple(dims), tuple(active), rows.device)
    inv_rows, norm_rows = inverse_prefix_norms(rows, tuple(dims), torch.float32)
    inv_cols, norm_cols = inverse_prefix_norms(cols, tuple(dims), torch.float32)
    lse = rows.new_empty(n_layers, n_rows, len(dims), dtype=torch.float32)  # the kernel writes every entry
    pos_logit = torch.empty_like(lse)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), n_layers)
    _m2d_fwd_kernel[grid](
        rows, cols, positives.to(torch.int32), bounds, flags, n_seg, inv_rows, inv_cols, lse, pos_logit,
        n_rows, n_cols, n_features, scale * LOG2E, **_launch_options(rows, dims, scale),
    )
    losses = torch.where(flags.bool(), (lse - pos_logit).mean(1) * LN2, 0.0).to(rows.dtype)
    return losses, lse, inv_rows, norm_rows, inv_cols, norm_cols


@m2d_forward.register_fake
def _(rows, cols, positives, dims, active, scale):
    n_layers, n_rows, _ = rows.shape
    table = rows.new_empty(n_layers, n_rows, len(dims), dtype=torch.float32)
    col_table = cols.new_empty(n_layers, cols.shape[1], len(dims), dtype=torch.float32)
    losses = rows.new_empty(n_layers, len(dims))
    return losses, table, table.clone(), table.clone(), col_table, col_table.clone()


@torch.library.custom_op("m2d_kernels::infonce_backward", mutates_args=())
def m2d_backward(
    grad_losses: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, positives: torch.Tensor, lse: torch.Tensor,
    inv_rows: torch.Tensor, norm_rows: torch.Tensor, inv_cols: torch.Tensor, norm_cols: torch.Tensor,
    dims: list[int], active: list[bool], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_losses * losses)`` with respect to rows and cols: two launches."""
    if rows.device.type == "cpu":
        _patch_interpreter_loop_bounds()
    rows, cols = rows.contiguous(), cols.contiguous()
    n_layers, n_rows, n_features = rows.shape
    n_cols = cols.shape[1]
    bounds, flags, n_seg = _segment_tables(tuple(dims), tuple(active), rows.device)
    coef = (grad_losses.float() * (scale / n_rows)).contiguous()
    positives = positives.to(torch.int32)
    # One set of fp32 work rows per resident program, shared by the two launches.
    slots = _resident_programs(rows.device)
    workspace = torch.empty(slots * _largest_block(), n_features, dtype=torch.float32, device=rows.device)
    options = _launch_options(rows, dims, scale)
    grads = []
    for for_cols, n_own, block, norm in ((False, n_rows, "BLOCK_R", norm_rows), (True, n_cols, "BLOCK_C", norm_cols)):
        grad = torch.empty_like(cols if for_cols else rows)
        grid = lambda meta, n_own=n_own, block=block: (
            min(n_layers * triton.cdiv(n_own, meta[block]), slots * _largest_block() // meta[block]),
        )
        _m2d_bwd_kernel[grid](
            rows, cols, positives, bounds, flags, n_seg, inv_rows, inv_cols, norm, lse, coef, grad, workspace,
            n_layers, n_rows, n_cols, n_features, scale * LOG2E, FOR_COLS=for_cols, **options,
        )
        grads.append(grad)
    return grads[0], grads[1]


@m2d_backward.register_fake
def _(grad_losses, rows, cols, positives, lse, inv_rows, norm_rows, inv_cols, norm_cols, dims, active, scale):
    return torch.empty_like(rows), torch.empty_like(cols)


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    rows, cols, positives, dims, active, scale = inputs
    _, lse, inv_rows, norm_rows, inv_cols, norm_cols = output
    ctx.save_for_backward(rows, cols, positives, lse, inv_rows, norm_rows, inv_cols, norm_cols)
    ctx.config = (dims, active, scale)


def _backward(ctx, grad_losses, *unused_table_grads):
    grad_rows, grad_cols = m2d_backward(grad_losses, *ctx.saved_tensors, *ctx.config)
    return grad_rows, grad_cols, None, None, None, None


m2d_forward.register_autograd(_backward, setup_context=_setup_context)


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
) -> torch.Tensor:
    """Per-pair InfoNCE losses ``[L, M]`` (0 where a pair is inactive), in the input dtype."""
    _check_dtype(queries)
    dims, flat_active = list(dims), [on for row in active for on in row]
    losses = m2d_forward(queries, docs, positive_index, dims, flat_active, scale)[0]
    if not symmetric:
        return losses
    # doc_to_query: the B positives are the rows, all queries the columns, query i the positive of row i.
    query_labels = torch.arange(queries.shape[1], device=queries.device)
    reverse = m2d_forward(docs.index_select(1, positive_index), queries, query_labels, dims, flat_active, scale)[0]
    return (losses + reverse) / 2
