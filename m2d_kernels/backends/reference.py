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

from m2d_kernels.rules import PLAIN, column_masks


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


# Pass API (backends/__init__.py): plain torch, one (layer, dim) pair at a time, like pair_losses, every
# rule of m2d_kernels.rules applied to a materialised [R, C] logit matrix. It is the oracle of the backends'
# passes; the whole objectives have their own oracle (objective_losses below), which does not use it.


def _similarity(x, y, dim, similarity):
    x, y = x[..., :dim], y[..., :dim]
    if similarity == "cos":
        x, y = F.normalize(x, p=2, dim=-1), F.normalize(y, p=2, dim=-1)
    return x @ y.T


def _pass_logits(rows, cols, layer, dim, scale, rules, masks):
    """``[R, C]`` logits of one pair under ``rules`` (-inf where excluded), differentiable through ``scale * s``."""
    sim = _similarity(rows[layer], cols[layer], dim, rules.similarity)
    logits = scale * sim
    excluded, penalised = masks
    if penalised is not None:
        logits = logits + torch.where(penalised, rules.penalty_strength * sim.detach(), 0.0)
    if excluded is not None:
        logits = logits.masked_fill(excluded, -torch.inf)
    return logits


def _masks(rows, cols, positives, rules):
    guide = rules.guide_rows @ rules.guide_cols.T if rules.guided else None
    return column_masks(rules, cols.shape[1], positives, guide)


def _positive(logits, positives):
    return torch.where(positives >= 0, logits.gather(1, positives.clamp_min(0)[:, None])[:, 0], 0.0)


def _offset(logits):
    """Row maximum, 0 for a row whose every column is excluded (its log_sum is then -inf)."""
    top = logits.amax(1)
    return torch.where(torch.isfinite(top), top, 0.0)


def _kept(values, logits):
    """``values`` with 0 where the logit is -inf (an excluded column): no 0 * inf."""
    return torch.where(torch.isfinite(logits), values, 0.0)


def row_statistics(rows, cols, dims, active, scale, positives, rules=PLAIN):
    """Pass API: ``(offset, log_sum, positive_logit)`` ``[L, R, M]``, and with ``rules.teacher`` the
    teacher-weighted logit sums ``sum_j exp(z_T - offset_T) z_lm`` as a fourth tensor."""
    n_layers, n_rows = len(active), rows.shape[1]
    offset = rows.new_zeros(n_layers, n_rows, len(dims))
    log_sum, positive, teacher_sum = torch.zeros_like(offset), torch.zeros_like(offset), torch.zeros_like(offset)
    with torch.no_grad():
        masks = _masks(rows, cols, positives, rules)
        teacher_weight = None
        if rules.teacher:
            teacher = _pass_logits(rows, cols, n_layers - 1, dims[-1], scale, rules, masks)
            teacher_weight = (teacher - _offset(teacher)[:, None]).exp()
        for layer, layer_active in enumerate(active):
            for m, dim in enumerate(dims):
                if layer_active[m]:
                    logits = _pass_logits(rows, cols, layer, dim, scale, rules, masks)
                    offset[layer, :, m] = _offset(logits)
                    log_sum[layer, :, m] = (logits - offset[layer, :, m, None]).exp().sum(1).log()
                    positive[layer, :, m] = _positive(logits, positives)
                    if teacher_weight is not None:
                        teacher_sum[layer, :, m] = _kept(teacher_weight * logits, logits).sum(1)
    return (offset, log_sum, positive, teacher_sum) if rules.teacher else (offset, log_sum, positive)


def pass_gradients(rows, cols, dims, active, scale, positives, offset, log_sum, coef, rules=PLAIN,
                   distill_coef=None):
    """Pass API: gradients of ``sum_lm coef_lm sum_i [LSE_i - z_i,p(i)]
    + distill_coef_lm sum_i [LSE_i - sum_j p_T(i, j) z_ij]`` where the softmaxes of LSE and of the teacher
    ``p_T`` (pair (L - 1, M - 1)) have the given statistics, from this block's columns."""
    n_layers = len(active)
    with torch.enable_grad():
        x, y = rows.detach().requires_grad_(), cols.detach().requires_grad_()
        masks = _masks(x, y, positives, rules)
        teacher_probs = None
        if distill_coef is not None:
            teacher = _pass_logits(x, y, n_layers - 1, dims[-1], scale, rules, masks).detach()
            teacher_probs = (teacher - offset[-1, :, -1, None] - log_sum[-1, :, -1, None]).exp()
        total = x.new_zeros(())
        for layer, layer_active in enumerate(active):
            for m, dim in enumerate(dims):
                if layer_active[m]:
                    logits = _pass_logits(x, y, layer, dim, scale, rules, masks)
                    probs = (logits.detach() - offset[layer, :, m, None] - log_sum[layer, :, m, None]).exp()
                    total = total + coef[layer, m] * (_kept(probs * logits, logits).sum()
                                                      - _positive(logits, positives).sum())
                    if teacher_probs is not None:
                        total = total + distill_coef[layer, m] * _kept((probs - teacher_probs) * logits, logits).sum()
        return torch.autograd.grad(total, (x, y), allow_unused=True, materialize_grads=True)
