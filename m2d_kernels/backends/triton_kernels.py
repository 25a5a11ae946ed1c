"""Backend ``triton``: the launchers, custom ops and pass of the Triton kernels, for CUDA tensors.

The module is split by role, top to bottom:

    triton_configs.py   tile configurations, launch heuristics, the backward's program count
    triton_tiles.py     @triton.jit helpers of both kernels: loads, products, the logits of a tile under the rules
    triton_forward.py   the forward kernel: row statistics of every (layer, dim) pair
    triton_backward.py  the backward kernel: dX over row blocks, dY over column blocks
    triton_kernels.py   (this file) launchers, torch custom ops, autograd, ``pair_losses``, the pass

Everything is phrased as one "rows vs columns" InfoNCE: ``rows`` ``[L, R, D]`` are scored against ``cols``
``[L, C, D]`` and row ``i``'s positive is column ``positives[i]``. The pass (backends/base.py) runs the
kernels under the rules of a pass; ``pair_losses`` is the fused path of the default options (query_to_doc,
and ``symmetric``'s doc_to_query as the same kernels with roles swapped: docs[positive_index], queries,
arange(B)), kept until the kernels move onto the contract.

Math (docs/design.md, "The prefix trick" and "The backward pass"), per layer l, dim index m, segment
``seg_m = [d_{m-1}, d_m)``::

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

The backward kernel is launched twice (dX over row blocks, dY over column blocks). For each [rows, cols]
tile it walks k upwards over [0, top) in exactly the forward's order (same chunks, same BLOCK_D), so the
recomputed logits are bit-identical to the forward's and the probabilities ``exp2((z - max) - logsum)``
are exact up to fp32 rounding; at each active boundary it writes ``W_m`` to a per-program tile slot. Then
it walks the segments downwards, summing the slots into ``H`` on chip (no subtraction, no cancellation)
and accumulating ``H Y[:, seg]`` into the owner block's fp32 work rows. Nothing of size ``R x C`` reaches
memory; the grid is persistent and the number of programs is bounded so that all scratch (work rows +
tile slots) stays under ``SCRATCH_BUDGET`` bytes (below the H100's 50 MB L2). Each output block has one
owner program, so the gradients are deterministic; the forward's column statistics
(``rules.column_statistics``) are ``tl.atomic_add`` sums of the row blocks, whose last bits depend on the
order the blocks ran in.

When every dim is a multiple of BLOCK_D (``ALIGNED``), the forward's accumulation is one flat k-loop over
[0, top) with the epilogue inside it at each boundary, and so are the plain backward's recompute and its
downward product loop: the software pipeline keeps loading the next chunks across a boundary instead of
draining and refilling at every segment. Other dims take per-segment loops with masked chunks.

Row statistics are kept relative to the row maximum (``max`` and ``log2 sum exp2(z - max)`` stored
separately), so a large ``scale`` costs no ulp(scale) error in the probabilities. ``scale`` is a fixed
maximum (``|cos| <= 1``) where numerics.fixed_max_is_exact allows it; above that the forward keeps a
running maximum.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from m2d_kernels.backends.base import PassGradients, PassStatistics, Softmax, check_columns
from m2d_kernels.backends.triton_backward import _m2d_bwd_kernel, _m2d_bwd_tuned
from m2d_kernels.backends.triton_configs import (
    BACKWARD_CONFIGS,
    BLOCK_DG,
    LN2,
    LOG2E,
    _backward_programs,
    _interpreting,
    _kernel_options,
    _multiprocessors,
    _size_classes,
    _tile_kwargs,
)
from m2d_kernels.backends.triton_forward import _m2d_fwd_kernel, _m2d_fwd_tuned
from m2d_kernels.numerics import (
    FIXED_MAX_SPAN,
    SECOND_DERIVATIVE_ERROR,
    device_table,
    fixed_max_is_exact,
    inverse_prefix_norms,
    positive_logits,
    prefix_norms,
)
from m2d_kernels.rules import PENALTY_CODES, PLAIN, Rules, check_rules

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)"




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
             "PENALTY_MODE": PENALTY_CODES[rules.penalty], "GUIDED": rules.guided, "TRIANGLE": rules.triangle,
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
                   FIXED_MAX=max_logit is not None and fixed_max_is_exact(max_logit, torch.float32),
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
# The pass (backends/base.py): the custom ops above on one block of columns
# ---------------------------------------------------------------------------------------


def _positive_logits(rows, cols, dims, active, scale, positives, rules):
    """``[L, R, M]`` ``z(i, positives_i)`` under ``rules`` in float64 (the kernels keep the positive logit of
    a row to themselves): the penalty where the positive's column is penalised, -inf where it is excluded,
    0 where ``positives_i == -1`` or the pair is inactive. ``O(L * R * D)``."""
    if rules.similarity == "cos" and rules.penalty is None and not rules.exclude_own_group and not rules.triangle:
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
    if rules.triangle:  # a positive on or below the diagonal (j <= i) is excluded
        below = positives <= torch.arange(len(positives), device=positives.device)
        logits = torch.where(below[None, :, None], -torch.inf, logits)
    keep = (positives >= 0)[None, :, None] & device_table(active, rows.device)[:, None, :]
    return torch.where(keep, logits, 0.0)


def shares_tiles(similarity: str, scale: float | None = None) -> bool:
    """Whether this backend's forward returns ``rules.column_statistics`` for ``similarity`` (and ``scale``,
    when given): the columns' sums are atomic adds relative to a fixed maximum, so cosine only, with
    the fixed maximum exact in fp32 (numerics.fixed_max_is_exact: scale <= 40)."""
    return similarity == "cos" and (scale is None or fixed_max_is_exact(scale, torch.float32))


def _check_column_statistics(rules: Rules, scale: float) -> None:
    if not rules.column_statistics:
        return
    if rules.similarity != "cos":
        raise ValueError("rules.column_statistics needs similarity 'cos' on the triton backend (a fixed maximum "
                         f"for the columns' atomic sums), got similarity={rules.similarity!r}")
    if not shares_tiles(rules.similarity, scale):
        raise ValueError(f"rules.column_statistics needs scale <= {FIXED_MAX_SPAN[torch.float32] / 2:g} on the "
                         f"triton backend (a fixed maximum whose exp(-2 * scale) stays a normal fp32 number), got "
                         f"scale={scale}")


def row_statistics(rows, cols, dims, active, scale, positives, rules=PLAIN, norms=None) -> PassStatistics:
    """The pass's forward (backends/base.py), float64 statistics. With ``rules.column_statistics = K``
    (``shares_tiles``: cosine, scale <= 40, else ValueError) the columns have the fixed offset ``scale`` (0 and
    -inf for a column with every entry excluded, 0 and 0 for an inactive pair); their sums are fp32 atomic adds
    of the row blocks, whose last bits depend on the order the blocks ran in. The kernels keep log2 units: the
    tables are fp64 so that the round trip ln <-> log2 gives back the kernels' fp32 values (an fp32 round trip
    costs ulp(scale * log2(e)) in every probability). ``rules.scale_slope`` is the fused path's
    (``pair_losses``), not the pass's: ValueError."""
    _check_dtype(rows)
    check_rules(rules, rows.shape[1], cols.shape[1], active)
    if rules.scale_slope:
        raise ValueError("rules.scale_slope is not implemented by the triton pass; the learnable scale takes "
                         "the fused default path (pair_losses)")
    _check_column_statistics(rules, scale)
    flat_active = [on for row in active for on in row]
    out = _launch_forward(rows, cols, positives, list(dims), flat_active, scale, False, rules, norms)
    positive = _positive_logits(rows, cols, dims, active, scale, positives, rules)
    softmax = Softmax(out[0].double() * LN2, out[1].double() * LN2)
    columns = None
    if rules.column_statistics:
        col_sum = out[-1].double()
        pair_active = _segment_tables(tuple(dims), tuple(flat_active), rows.device)[1].bool()[:, None, :]
        columns = Softmax(torch.where(pair_active & (col_sum > 0), float(scale), 0.0),
                          torch.where(pair_active, col_sum.log(), 0.0))
    return PassStatistics(softmax, positive, out[-2].double() * LN2 if rules.teacher else None, columns)


def pass_gradients(rows, cols, dims, active, scale, positives, softmax, coef, rules=PLAIN, distill_coef=None,
                   columns=None, norms=None) -> PassGradients:
    """The pass's backward (backends/base.py), in the input dtype; the column statistics take any similarity
    and scale (the backward needs no fixed maximum)."""
    _check_dtype(rows)
    check_rules(rules, rows.shape[1], cols.shape[1], active, distill_coef is not None)
    check_columns(rules, columns, len(active), len(dims))
    flat_active = [on for row in active for on in row]
    row_norms, col_norms = norms or (None, None)
    inv_rows, norm_rows = prefix_norms(rows, tuple(dims), torch.float32, row_norms)
    inv_cols, norm_cols = prefix_norms(cols, tuple(dims), torch.float32, col_norms)
    # The kernels' coefficients multiply d / d z per row loss by scale (d z / d s).
    distill = None if distill_coef is None else (distill_coef * scale).float()
    d_rows, d_cols = _launch_backward((coef * scale).float(), rows, cols, positives,
                                      (softmax.offset * LOG2E).float().contiguous(),
                                      (softmax.log_sum * LOG2E).float().contiguous(), inv_rows, norm_rows, inv_cols,
                                      norm_cols, list(dims), flat_active, scale, rules, distill,
                                      None if columns is None else columns.offset,
                                      None if columns is None else columns.log_sum)
    return PassGradients(d_rows, d_cols)
