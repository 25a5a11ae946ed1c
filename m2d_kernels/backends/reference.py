"""Backend ``reference``: the naive per-(layer, dim) computation.

Exactly what sentence-transformers' ``MultipleNegativesRankingLoss`` does on
``F.normalize(x[..., :d])`` for every selected (layer, dim) pair: one normalise, one
``B x N`` similarity matrix and one cross-entropy per pair, all kept for autograd.
It is the oracle of the test suite and the baseline of the benchmarks; ``backend="auto"``
never picks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unavailable_reason(device: torch.device) -> str | None:
    return None


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
    ``scale_grad`` also ``d loss_lm / d scale`` ``[L, M]`` (detached). Differentiable twice."""
    n_queries = queries.shape[1]
    query_labels = torch.arange(n_queries, device=queries.device)
    zero = queries.new_zeros(())
    losses, dloss_dscale = [], []
    for layer, layer_active in enumerate(active):
        for dim_index, dim in enumerate(dims):
            if not layer_active[dim_index]:
                losses.append(zero)
                dloss_dscale.append(zero)
                continue
            q = F.normalize(queries[layer, :, :dim], p=2, dim=-1)
            k = F.normalize(docs[layer, :, :dim], p=2, dim=-1)
            # query_to_doc: each query against every candidate.
            cos = q @ k.T
            loss = F.cross_entropy(cos * scale, positive_index)
            slope = _scale_slope(cos.detach(), positive_index, scale) if scale_grad else zero
            if symmetric:
                # doc_to_query, partition_mode="per_direction": each positive against every query.
                cos_d2q = k[positive_index] @ q.T
                loss = (loss + F.cross_entropy(cos_d2q * scale, query_labels)) / 2
                if scale_grad:
                    slope = (slope + _scale_slope(cos_d2q.detach(), query_labels, scale)) / 2
            losses.append(loss)
            dloss_dscale.append(slope)
    losses = torch.stack(losses).view(len(active), len(dims))
    return (losses, torch.stack(dloss_dscale).view_as(losses)) if scale_grad else losses


def _scale_slope(cos: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """d/dscale of mean_i cross_entropy(scale * cos_i, labels_i) = mean_i [E_softmax(cos_i) - cos_i,label]."""
    probs = torch.softmax(scale * cos, dim=1)
    return ((probs * cos).sum(1) - cos.gather(1, labels[:, None])[:, 0]).mean()


# Pass API (backends/__init__.py): plain torch, one (layer, dim) pair at a time, like pair_losses.


def _pair_logits(rows, cols, layer, dim, scale):
    return scale * (F.normalize(rows[layer, :, :dim], p=2, dim=-1) @ F.normalize(cols[layer, :, :dim], p=2, dim=-1).T)


def _positive(logits, positives):
    return torch.where(positives >= 0, logits.gather(1, positives.clamp_min(0)[:, None])[:, 0], 0.0)


def row_statistics(rows, cols, dims, active, scale, positives):
    """Pass API: ``(offset, log_sum, positive_logit)`` ``[L, R, M]``: the row maximum, log sum exp(z - max),
    and the positive's logit (0 where ``positives == -1`` or the pair is inactive)."""
    offset = rows.new_zeros(len(active), rows.shape[1], len(dims))
    log_sum, positive = torch.zeros_like(offset), torch.zeros_like(offset)
    with torch.no_grad():
        for layer, layer_active in enumerate(active):
            for m, dim in enumerate(dims):
                if layer_active[m]:
                    logits = _pair_logits(rows, cols, layer, dim, scale)
                    offset[layer, :, m] = logits.amax(1)
                    log_sum[layer, :, m] = (logits - offset[layer, :, m, None]).exp().sum(1).log()
                    positive[layer, :, m] = _positive(logits, positives)
    return offset, log_sum, positive


def pass_gradients(rows, cols, dims, active, scale, positives, offset, log_sum, coef):
    """Pass API: gradients of ``sum_lm coef_lm sum_i [LSE_i - z_i,p(i)]`` where the softmax of LSE has the
    given statistics, from this block's columns."""
    with torch.enable_grad():
        x, y = rows.detach().requires_grad_(), cols.detach().requires_grad_()
        total = x.new_zeros(())
        for layer, layer_active in enumerate(active):
            for m, dim in enumerate(dims):
                if layer_active[m]:
                    logits = _pair_logits(x, y, layer, dim, scale)
                    probs = (logits.detach() - offset[layer, :, m, None] - log_sum[layer, :, m, None]).exp()
                    total = total + coef[layer, m] * ((probs * logits).sum() - _positive(logits, positives).sum())
        return torch.autograd.grad(total, (x, y), allow_unused=True, materialize_grads=True)
