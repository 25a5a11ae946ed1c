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
    @staticmethod
    def forward(ctx, queries, docs, dims, active, scale, positive_index, symmetric):
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
        # Per-row log-sum-exp of both directions, the only statistics backward needs.
        row_lse = queries.new_zeros(n_layers, n_queries, n_dims, dtype=acc)
        col_lse = queries.new_zeros(n_layers, n_queries, n_dims, dtype=acc) if symmetric else None
        losses = queries.new_zeros(n_layers, n_dims, dtype=acc)

        for layer, layer_active in enumerate(active):
            if not any(layer_active):
                continue
            last = max(m for m, on in enumerate(layer_active) if on)
            q_all = queries[layer].to(acc)
            k_all = docs[layer].to(acc)
            col_lse_parts = [[] for _ in range(n_dims)]
            positive_sum = [0.0] * n_dims
            for r0 in range(0, n_queries, chunk):
                rows = slice(r0, min(r0 + chunk, n_queries))
                q = q_all[rows]
                positives = positive_index[rows, None]
                sim = q.new_zeros(q.shape[0], n_docs)
                for m, (a, b) in enumerate(segments[: last + 1]):
                    sim.addmm_(q[:, a:b], k_all[:, a:b].T)
                    if not layer_active[m]:
                        continue
                    logits = sim * inv_q_scaled[layer, rows, m, None]
                    logits.mul_(inv_k[layer, None, :, m])
                    positive = logits.gather(1, positives).sum()
                    if fixed_max:  # reuse the exponentials for row and column sums
                        exps = logits.sub_(scale).exp_()
                        lse = exps.sum(1).log_().add_(scale)
                        column_lse = exps[:, positive_index].sum(0).log_().add_(scale) if symmetric else None
                    else:
                        lse = torch.logsumexp(logits, dim=1)
                        column_lse = torch.logsumexp(logits[:, positive_index], dim=0) if symmetric else None
                    row_lse[layer, rows, m] = lse
                    losses[layer, m] += lse.sum() - positive
                    if symmetric:
                        # Log-sum-exp of the B positive docs against this chunk of queries.
                        col_lse_parts[m].append(column_lse)
                        positive_sum[m] = positive_sum[m] + positive
            if symmetric:
                for m, on in enumerate(layer_active):
                    if on:
                        lse = torch.logsumexp(torch.stack(col_lse_parts[m]), dim=0)
                        col_lse[layer, :, m] = lse
                        losses[layer, m] = (losses[layer, m] + lse.sum() - positive_sum[m]) / 2

        ctx.save_for_backward(queries, docs, positive_index, inv_q, norm_factor_q, inv_k, norm_factor_k, row_lse,
                              col_lse)
        ctx.config = (dims, active, scale, symmetric, chunk)
        return (losses / n_queries).to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_losses):
        queries, docs, positive_index, inv_q, norm_factor_q, inv_k, norm_factor_k, row_lse, col_lse = ctx.saved_tensors
        dims, active, scale, symmetric, chunk = ctx.config
        acc = row_lse.dtype
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
                    sim.addmm_(q[:, a:b], k_all[:, a:b].T)
                    if not layer_active[m]:
                        continue
                    rq = inv_q[layer, rows, m]
                    rk = inv_k[layer, :, m]
                    scaled_rq = scale * rq
                    # grad_cos / coef = P - onehot, with P = exp(scale * cos - lse); built in place.
                    grad = sim * scaled_rq[:, None]
                    grad.mul_(rk[None, :]).sub_(row_lse[layer, rows, m, None]).exp_()
                    grad[row_ids, positive_index[rows]] -= 1.0
                    if symmetric:
                        column_logits = sim[:, positive_index] * scaled_rq[:, None] * rk[positive_index][None, :]
                        column_probs = column_logits.sub_(col_lse[layer, None, :, m]).exp_()
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

        return grad_q.to(queries.dtype), grad_k.to(docs.dtype), None, None, None, None, None


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
    return Matryoshka2dInfoNCEFunction.apply(queries, docs, dims, active, scale, positive_index, symmetric)
