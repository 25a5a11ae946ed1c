"""Backend ``torch``: the prefix trick in plain PyTorch, chunked over query rows.

Math (DESIGN.md section 1). For layer l and nested dim d_m, with segments
``seg_m = [d_{m-1}, d_m)``::

    S_m      = S_{m-1} + Q[:, seg_m] K[:, seg_m]^T          one accumulator over D
    cos_m    = diag(rq_m) S_m diag(rk_m)                     rq_m = 1 / max(|q[:d_m]|, eps)
    loss_lm  = mean_i [ logsumexp_j(scale * cos_m(i, j)) - scale * cos_m(i, p(i)) ]

Backward, with ``G_m = dLoss/dcos_m`` and suffix sums over dims ``m >= s``::

    dQ[:, seg_s] = H_s K[:, seg_s] - alpha_s * Q[:, seg_s]     H_s = sum_{m>=s} diag(rq_m) G_m diag(rk_m)
    dK[:, seg_s] = H_s^T Q[:, seg_s] - beta_s * K[:, seg_s]    alpha_s = sum_{m>=s} rq_m^2 rowsum(G_m * cos_m)

Query rows are processed in chunks inside one ``torch.autograd.Function`` that saves only
``[L, B, M]`` statistics and recomputes the similarities in backward, so the extra memory
is ``O(chunk * N * M)``, never ``O(L * M * B * N)``. Runs on any device.
"""

from __future__ import annotations

import torch

EPS = 1e-12  # F.normalize's default
# Elements of one [chunk, N] working set; the backward keeps about (M + 4) of them.
CHUNK_ELEMENTS = 1 << 22


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _segments(dims: tuple[int, ...]) -> list[tuple[int, int]]:
    starts = (0,) + dims[:-1]
    return list(zip(starts, dims))


def inverse_prefix_norms(
    x: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, R, M]`` tables in ``dtype``: ``rx_m = 1 / max(|x[..., :d_m]|, eps)`` and the norm factor
    of the backward, ``rx_m^2`` where the norm was not clamped, else 0. Shared by every fused backend."""
    # vector_norm accumulates in `dtype` without materialising a copy of x in that dtype.
    norms = torch.stack([torch.linalg.vector_norm(x[..., a:b], dim=-1, dtype=dtype) for a, b in _segments(dims)], -1)
    norms = norms.square().cumsum(-1).sqrt()
    inverse = 1.0 / norms.clamp_min(EPS)
    return inverse.contiguous(), torch.where(norms >= EPS, inverse.square(), 0.0).contiguous()


def _fixed_max_is_safe(scale: float, dtype: torch.dtype) -> bool:
    """Whether ``exp(scale * (cos - 1)) >= exp(-2 * scale)`` stays a normal float, so that
    ``scale`` can serve as the log-sum-exp maximum with no running max."""
    return 2 * scale < (700.0 if dtype == torch.float64 else 80.0)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n_queries: int, n_docs: int, n_dims: int) -> int:
    return max(1, min(n_queries, CHUNK_ELEMENTS // (n_docs * (n_dims + 4))))


class Matryoshka2dInfoNCEFunction(torch.autograd.Function):
    """Forward and backward of all (layer, dim) pairs; the last output is ``d loss_lm / d scale``
    (zeros unless ``scale_grad``), which carries no gradient of its own."""

    @staticmethod
    def forward(ctx, queries, docs, dims, active, scale, positive_index, symmetric, scale_grad):
        acc = accumulator_dtype(queries.dtype)
        n_layers, n_queries, _ = queries.shape
        n_docs = docs.shape[1]
        n_dims = len(dims)
        segments = _segments(dims)
        chunk = _chunk_rows(n_queries, n_docs, n_dims)

        inv_q, norm_factor_q = inverse_prefix_norms(queries, dims, acc)
        inv_k, norm_factor_k = inverse_prefix_norms(docs, dims, acc)
        inv_q_scaled = inv_q * scale
        fixed_max = _fixed_max_is_safe(scale, acc)
        # Per-row softmax statistics of both directions, the only ones backward needs, kept relative to
        # the row's maximum (offset) so that no number of magnitude `scale` is ever rounded into them.
        row_offset = queries.new_zeros(n_layers, n_queries, n_dims, dtype=acc)
        row_log_sum = torch.zeros_like(row_offset)
        col_offset = torch.zeros_like(row_offset) if symmetric else None
        col_log_sum = torch.zeros_like(row_offset) if symmetric else None
        losses = queries.new_zeros(n_layers, n_dims, dtype=acc)
        dloss_dscale = torch.zeros_like(losses)

        for layer, layer_active in enumerate(active):
            if not any(layer_active):
                continue
            last = max(m for m, on in enumerate(layer_active) if on)
            q_all = queries[layer].to(acc)
            k_all = docs[layer].to(acc)
            col_parts = [[] for _ in range(n_dims)]  # per query chunk: column stats of the B positives
            col_positive = [[] for _ in range(n_dims)]
            for r0 in range(0, n_queries, chunk):
                rows = slice(r0, min(r0 + chunk, n_queries))
                q = q_all[rows]
                sim = q.new_zeros(q.shape[0], n_docs)
                for m, (a, b) in enumerate(segments[: last + 1]):
                    sim.addmm_(q[:, a:b], k_all[:, a:b].T)
                    if not layer_active[m]:
                        continue
                    logits = sim * inv_q_scaled[layer, rows, m, None]
                    logits.mul_(inv_k[layer, None, :, m])
                    positive = logits.gather(1, positive_index[rows, None])[:, 0]
                    offset, exp_sum, exp_logit_sum = _partial_stats(logits, 1, scale if fixed_max else None, scale_grad)
                    row_offset[layer, rows, m] = offset
                    row_log_sum[layer, rows, m] = exp_sum.log()
                    losses[layer, m] += ((offset - positive) + exp_sum.log()).sum()
                    if scale_grad:
                        dloss_dscale[layer, m] += (exp_logit_sum / exp_sum - positive).sum() / scale
                    if symmetric:
                        # This chunk of queries against the B positives; combined over chunks below.
                        col_parts[m].append(_partial_stats(logits[:, positive_index], 0, scale if fixed_max else None,
                                                           scale_grad))
                        col_positive[m].append(positive)
            if symmetric:
                for m, on in enumerate(layer_active):
                    if not on:
                        continue
                    offset, exp_sum, exp_logit_sum = _combine_partial_stats(col_parts[m])
                    positive = torch.cat(col_positive[m])  # query i's positive logit is column i's too
                    col_offset[layer, :, m] = offset
                    col_log_sum[layer, :, m] = exp_sum.log()
                    losses[layer, m] = (losses[layer, m] + ((offset - positive) + exp_sum.log()).sum()) / 2
                    if scale_grad:
                        column = (exp_logit_sum / exp_sum - positive).sum() / scale
                        dloss_dscale[layer, m] = (dloss_dscale[layer, m] + column) / 2

        ctx.save_for_backward(queries, docs, positive_index, inv_q, norm_factor_q, inv_k, norm_factor_k, row_offset,
                              row_log_sum, col_offset, col_log_sum)
        ctx.config = (dims, active, scale, symmetric, chunk)
        dloss_dscale /= n_queries
        ctx.mark_non_differentiable(dloss_dscale)
        return (losses / n_queries).to(queries.dtype), dloss_dscale

    @staticmethod
    def backward(ctx, grad_losses, _grad_dloss_dscale):
        queries, docs = ctx.saved_tensors[:2]
        with torch.no_grad():
            grad_q, grad_k = _backward(ctx, grad_losses)
        return first_order_only(grad_q, queries), first_order_only(grad_k, docs), None, None, None, None, None, None


def _backward(ctx, grad_losses):
    (queries, docs, positive_index, inv_q, norm_factor_q, inv_k, norm_factor_k, row_offset, row_log_sum,
     col_offset, col_log_sum) = ctx.saved_tensors
    dims, active, scale, symmetric, chunk = ctx.config
    acc = row_offset.dtype
    n_layers, n_queries, _ = queries.shape
    n_docs = docs.shape[1]
    segments = _segments(dims)
    # d pair-loss / d cos = coef * (P - onehot); each direction counts half when symmetric.
    coef = grad_losses.to(acc) * (scale / n_queries / (2 if symmetric else 1))
    grad_q = torch.zeros_like(queries, dtype=acc)
    grad_k = torch.zeros_like(docs, dtype=acc)

    for layer, layer_active in enumerate(active):
        if not any(layer_active):
            continue
        last = max(m for m, on in enumerate(layer_active) if on)
        q_all = queries[layer].to(acc)
        k_all = docs[layer].to(acc)
        # beta before the rk^2 factor: colsum(G_m * cos_m) = colsum(H_m * S_m), summed over query chunks.
        gc_colsum = k_all.new_zeros(n_docs, len(dims))
        for r0 in range(0, n_queries, chunk):
            rows = slice(r0, min(r0 + chunk, n_queries))
            q = q_all[rows]
            n_rows = q.shape[0]
            row_ids = torch.arange(n_rows, device=q.device)
            sim = q.new_zeros(n_rows, n_docs)
            h_terms = {}
            for m, (a, b) in enumerate(segments[: last + 1]):
                # The same operations in the same order as the forward: bit-identical logits.
                sim.addmm_(q[:, a:b], k_all[:, a:b].T)
                if not layer_active[m]:
                    continue
                rq = inv_q[layer, rows, m]
                rk = inv_k[layer, :, m]
                scaled_rq = scale * rq
                # grad_cos / coef = P - onehot, with P = exp((z - offset) - log_sum); built in place.
                grad = sim * scaled_rq[:, None]
                grad.mul_(rk[None, :]).sub_(row_offset[layer, rows, m, None])
                grad.sub_(row_log_sum[layer, rows, m, None]).exp_()
                grad[row_ids, positive_index[rows]] -= 1.0
                if symmetric:
                    column_logits = sim[:, positive_index] * scaled_rq[:, None] * rk[positive_index][None, :]
                    column_probs = column_logits.sub_(col_offset[layer, None, :, m])
                    column_probs = column_probs.sub_(col_log_sum[layer, None, :, m]).exp_()
                    column_probs[row_ids, row_ids + r0] -= 1.0
                    grad.index_add_(1, positive_index, column_probs)
                # H = coef * grad * rq * rk; then sum_j H S = rq * sum_j G cos gives alpha, sum_i H S beta.
                h = grad.mul_((coef[layer, m] * rq)[:, None]).mul_(rk[None, :])
                h_times_sim = h * sim
                alpha = norm_factor_q[layer, rows, m] * h_times_sim.sum(1)
                gc_colsum[:, m] += h_times_sim.sum(0)
                h_terms[m] = (h, alpha)
            # Walk the segments from the largest dim down, keeping the suffix sums.
            h_suffix, alpha_suffix = None, None
            for m in range(last, -1, -1):
                if m in h_terms:
                    h_m, alpha_m = h_terms.pop(m)
                    h_suffix = h_m if h_suffix is None else h_suffix.add_(h_m)
                    alpha_suffix = alpha_m if alpha_suffix is None else alpha_suffix + alpha_m
                a, b = segments[m]
                grad_q[layer, rows, a:b] = h_suffix @ k_all[:, a:b] - alpha_suffix[:, None] * q[:, a:b]
                grad_k[layer, :, a:b] += h_suffix.T @ q[:, a:b]
        beta = (norm_factor_k[layer] * gc_colsum).flip(-1).cumsum(-1).flip(-1)
        for m, (a, b) in enumerate(segments[: last + 1]):
            grad_k[layer, :, a:b] -= beta[:, m, None] * k_all[:, a:b]

    return grad_q.to(queries.dtype), grad_k.to(docs.dtype)


# Raised by every fused backend when its gradient is differentiated again.
SECOND_DERIVATIVE_ERROR = (
    "m2d-kernels: the fused backends compute first derivatives only; a second derivative (double "
    "backward through a gradient taken with create_graph=True) needs backend='reference'"
)


class _RefuseSecondDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)


def first_order_only(grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``grad`` as a backward returns it; under ``create_graph=True`` its graph raises a clear error
    when differentiated, so a second derivative is refused instead of silently wrong. ``anchor``
    is the input whose gradient ``grad`` is. Shared by every fused backend."""
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _RefuseSecondDerivative.apply(grad, anchor)
    return grad


def _partial_stats(logits: torch.Tensor, dim: int, fixed_max: float | None, with_logit_sum: bool):
    """Softmax statistics along ``dim`` relative to an offset (``fixed_max``, or the maximum along
    ``dim``): ``(offset, sum exp(z - offset), sum exp(z - offset) * z)`` (the last None unless
    ``with_logit_sum``). Consumes ``logits`` when they are a fresh tensor."""
    offset = logits.amax(dim) if fixed_max is None else logits.new_full(logits.shape[1 - dim: 2 - dim], fixed_max)
    exps = (logits - offset.unsqueeze(dim)).exp_()
    exp_logit_sum = (exps * logits).sum(dim) if with_logit_sum else None
    return offset, exps.sum(dim), exp_logit_sum


def _combine_partial_stats(parts):
    """One set of statistics from per-chunk ``_partial_stats`` of the same columns."""
    offsets = torch.stack([offset for offset, _, _ in parts])
    offset = offsets.amax(0)
    rescale = (offsets - offset).exp_()  # all ones with a fixed maximum
    exp_sum = (torch.stack([s for _, s, _ in parts]) * rescale).sum(0)
    if parts[0][2] is None:
        return offset, exp_sum, None
    return offset, exp_sum, (torch.stack([z for _, _, z in parts]) * rescale).sum(0)


def pair_losses(
    queries: torch.Tensor,
    docs: torch.Tensor,
    dims: tuple[int, ...],
    active: tuple[tuple[bool, ...], ...],
    scale: float,
    positive_index: torch.Tensor,
    symmetric: bool,
    scale_grad: bool = False,
):
    """Per-pair InfoNCE losses ``[L, M]`` (0 where a pair is inactive), in the input dtype; with
    ``scale_grad`` also ``d loss_lm / d scale`` ``[L, M]`` (accumulator dtype)."""
    losses, dloss_dscale = Matryoshka2dInfoNCEFunction.apply(
        queries, docs, dims, active, scale, positive_index, symmetric, scale_grad
    )
    return (losses, dloss_dscale) if scale_grad else losses


# ---------------------------------------------------------------------------------------
# Pass API (see backends/__init__.py): one block of columns, statistics given, no autograd
# ---------------------------------------------------------------------------------------


class _Saved:
    """Stands in for an autograd ctx so that a pass runs this backend's forward and backward unchanged."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def positive_logits(rows, cols, dims, active, scale, positives) -> torch.Tensor:
    """``[L, R, M]`` ``scale * cos_m(rows_i, cols_{positives_i})`` in the accumulator dtype, 0 where
    ``positives_i == -1`` or the pair is inactive. Differentiable; ``O(L * R * D)``. Shared by the fused
    backends' passes, whose kernels keep the positive logit of a row to themselves."""
    acc = accumulator_dtype(rows.dtype)
    x, y = rows.to(acc), cols.index_select(1, positives.clamp_min(0)).to(acc)
    products = torch.stack([(x[..., a:b] * y[..., a:b]).sum(-1) for a, b in _segments(dims)], -1).cumsum(-1)
    logits = products * inverse_prefix_norms(x, dims, acc)[0] * inverse_prefix_norms(y, dims, acc)[0] * scale
    keep = (positives >= 0)[None, :, None] & torch.tensor(active, device=rows.device)[:, None, :]
    return torch.where(keep, logits, 0.0)


def row_statistics(rows, cols, dims, active, scale, positives):
    """Pass API: ``(offset, log_sum, positive_logit)`` ``[L, R, M]`` of rows against this block of columns."""
    saved = _Saved()
    with torch.no_grad():
        # The statistics do not depend on the positives; the forward only needs valid ones for its (unused) loss.
        Matryoshka2dInfoNCEFunction.forward(saved, rows, cols, dims, active, scale, positives.clamp_min(0), False,
                                            False)
        offset, log_sum = saved.saved_tensors[7:9]
        return offset, log_sum, positive_logits(rows, cols, dims, active, scale, positives)


def pass_gradients(rows, cols, dims, active, scale, positives, offset, log_sum, coef):
    """Pass API: ``(d_rows, d_cols)`` in the accumulator dtype (backends/__init__.py)."""
    acc = accumulator_dtype(rows.dtype)
    n_rows, n_cols = rows.shape[1], cols.shape[1]
    saved = _Saved()
    anchors = positives.clamp_min(0)
    # Inputs in the accumulator dtype (_backward converts them layer by layer anyway; a copy only for
    # fp16/bf16): the gradients come back unrounded, so the one-hot taken back below cancels exactly and
    # the caller rounds the sum over blocks once.
    rows, cols = rows.to(acc), cols.to(acc)
    saved.save_for_backward(rows, cols, anchors, *inverse_prefix_norms(rows, dims, acc),
                            *inverse_prefix_norms(cols, dims, acc), offset, log_sum, None, None)
    saved.config = (dims, active, scale, False, _chunk_rows(n_rows, n_cols, len(dims)))
    with torch.no_grad():
        # _backward's coefficient is grad_losses * scale / R per cosine; ours is per row loss.
        d_rows, d_cols = (g.to(acc) for g in _backward(saved, coef * n_rows))
    # _backward subtracts a one-hot at column `anchors_i` from every row: rows without a positive in this
    # block (anchor 0) take it back with the gradient of + coef * z(i, 0), O(L * R * D).
    with torch.enable_grad():
        x, y = rows.detach().requires_grad_(), cols[:, :1].detach().requires_grad_()
        taken_back = torch.where(positives < 0, 0, -1)
        logits = positive_logits(x, y, dims, active, scale, taken_back)
        d_x, d_y = torch.autograd.grad((logits * coef.to(acc)[:, None, :]).sum(), (x, y), materialize_grads=True)
    d_rows += d_x
    d_cols[:, :1] += d_y
    return d_rows, d_cols
