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

from m2d_kernels.backends.base import PassGradients, PassStatistics, Softmax, check_columns
from m2d_kernels.rules import PLAIN, check_rules, column_masks, guide_tie_tolerance

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device) -> str | None:
    return None


def shares_tiles(similarity: str, scale: float | None = None) -> bool:
    """The pass applies rules.triangle and rules.column_statistics for every similarity and scale."""
    return True


# Pass API (backends/base.py): plain torch, one (layer, dim) pair at a time, every
# rule of m2d_kernels.rules applied to a materialised [R, C] logit matrix. It is the oracle of the backends'
# passes; the whole objectives have their own oracle (objective_losses below), which does not use it.


def _similarity(x, y, dim, similarity):
    x, y = x[..., :dim], y[..., :dim]
    if similarity == "cos":
        x, y = F.normalize(x, p=2, dim=-1), F.normalize(y, p=2, dim=-1)
    return x @ y.T


def _pass_logits(rows, cols, layer, dim, scale, rules, masks, penalty=True):
    """``[R, C]`` logits of one pair under ``rules`` (-inf where excluded), differentiable through ``scale * s``;
    ``penalty=False``: the columns' logits (rules.column_statistics), which carry no penalty."""
    sim = _similarity(rows[layer], cols[layer], dim, rules.similarity)
    logits = scale * sim
    excluded, penalised = masks
    if penalised is not None and penalty:
        logits = logits + torch.where(penalised, rules.penalty_strength * sim.detach(), 0.0)
    if excluded is not None:
        logits = logits.masked_fill(excluded, -torch.inf)
    return logits


def _masks(rows, cols, positives, rules):
    guide = rules.guide_rows @ rules.guide_cols.T if rules.guided else None
    return column_masks(rules, cols.shape[1], positives, guide)


def _positive(logits, positives):
    return torch.where(positives >= 0, logits.gather(1, positives.clamp_min(0)[:, None])[:, 0], 0.0)


def _offset(logits, dim=1):
    """Row maximum (``dim=0``: column maximum), 0 where every entry is excluded (log_sum is then -inf)."""
    top = logits.amax(dim)
    return torch.where(torch.isfinite(top), top, 0.0)


def _kept(values, logits):
    """``values`` with 0 where the logit is -inf (an excluded column): no 0 * inf."""
    return torch.where(torch.isfinite(logits), values, 0.0)


def row_statistics(rows, cols, dims, active, scale, positives, rules=PLAIN, norms=None) -> PassStatistics:
    """The pass's forward (backends/base.py) on materialised ``[R, C]`` logits, in the input dtype."""
    check_rules(rules, rows.shape[1], cols.shape[1], active)
    n_layers, n_rows, n_stat_cols = len(active), rows.shape[1], rules.column_statistics
    offset = rows.new_zeros(n_layers, n_rows, len(dims))
    log_sum, positive, teacher_sum = torch.zeros_like(offset), torch.zeros_like(offset), torch.zeros_like(offset)
    expected = torch.zeros_like(offset)
    col_offset = rows.new_zeros(n_layers, n_stat_cols, len(dims))
    col_log_sum, col_expected = torch.zeros_like(col_offset), torch.zeros_like(col_offset)
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
                    if rules.scale_slope:  # nothing excluded (check_rules): no 0 * -inf
                        expected[layer, :, m] = (torch.softmax(logits, 1) * logits).sum(1)
                    if teacher_weight is not None:
                        teacher_sum[layer, :, m] = _kept(teacher_weight * logits, logits).sum(1)
                    if n_stat_cols:
                        col_logits = _pass_logits(rows, cols, layer, dim, scale, rules, masks, penalty=False)
                        col_logits = col_logits[:, :n_stat_cols]
                        col_offset[layer, :, m] = _offset(col_logits, dim=0)
                        col_log_sum[layer, :, m] = (col_logits - col_offset[layer, None, :, m]).exp().sum(0).log()
                        if rules.scale_slope:
                            col_expected[layer, :, m] = (torch.softmax(col_logits, 0) * col_logits).sum(0)
    slope = rules.scale_slope
    columns = Softmax(col_offset, col_log_sum, col_expected if slope else None) if n_stat_cols else None
    return PassStatistics(Softmax(offset, log_sum, expected if slope else None), positive,
                          teacher_sum if rules.teacher else None, columns)


def pass_gradients(rows, cols, dims, active, scale, positives, softmax, coef, rules=PLAIN, distill_coef=None,
                   columns=None, norms=None) -> PassGradients:
    """The pass's backward (backends/base.py) by autograd through materialised logits, with the given
    statistics as constants: ``P = exp(z - offset - log_sum)`` enters as ``sum P * z``, whose gradient is
    ``P dz``."""
    check_rules(rules, rows.shape[1], cols.shape[1], active, distill_coef is not None)
    check_columns(rules, columns, len(active), len(dims))
    n_layers, n_stat_cols = len(active), rules.column_statistics
    offset, log_sum = softmax.offset, softmax.log_sum
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
                    if n_stat_cols:
                        col_logits = _pass_logits(x, y, layer, dim, scale, rules, masks, penalty=False)
                        col_logits = col_logits[:, :n_stat_cols]
                        col_probs = (col_logits.detach() - columns.offset[layer, None, :, m]
                                     - columns.log_sum[layer, None, :, m]).exp()
                        total = total + coef[layer, m] * _kept(col_probs * col_logits, col_logits).sum()
        d_rows, d_cols = torch.autograd.grad(total, (x, y), allow_unused=True, materialize_grads=True)
    return PassGradients(d_rows, d_cols)


# The objectives of m2d_kernels.objective (directions, partitions, hardness, dot, guide, distillation),
# written the way sentence-transformers writes them (MultipleNegativesRankingLoss.compute_loss_from_embeddings,
# GISTEmbedLoss.forward): one materialised similarity block per direction and pair. It is the oracle of the
# composed passes and shares no code with them (nor with m2d_kernels.rules).


def objective_losses(queries, world_queries, world_docs, rank_offset, positive_index, dims, active, scale, objective):
    """``[L, M]`` losses (and with ``objective.distill_weights`` the ``[L, M]`` mean KL terms) of the local
    ``queries`` ``[L, B, D]`` against ``world_queries`` ``[L, G, D]`` (this rank's at rows ``rank_offset``...)
    and ``world_docs`` ``[L, N, D]`` (sentence-transformers' gathered layout); ``positive_index`` indexes
    ``world_docs``. Differentiable twice."""
    n_layers, n_queries, _ = queries.shape
    n_world, n_docs = world_queries.shape[1], world_docs.shape[1]
    directions = objective.directions
    rows = torch.arange(n_queries, device=queries.device)
    local = rows + rank_offset
    # Guide masks (GISTEmbedLoss): True where a candidate is dropped.
    guide_masks = {}
    if objective.guide_queries is not None:
        guide_dtype = torch.promote_types(queries.dtype, torch.float32)  # the kernels' accumulator
        guide_q = F.normalize(objective.guide_queries.detach().to(guide_dtype), dim=-1)
        guide_d = F.normalize(objective.guide_docs.detach().to(guide_dtype), dim=-1)
        guide_p = guide_d[positive_index]
        threshold = (guide_q * guide_p).sum(-1, keepdim=True)
        if objective.guide_margin_strategy == "absolute":
            threshold = threshold - objective.guide_margin
        else:
            threshold = threshold - threshold.abs() * objective.guide_margin
        # Cosines equal to the positive's up to rounding tie with it, and ties are kept (rules.guide_tie_tolerance).
        threshold = threshold + guide_tie_tolerance(guide_q.shape[1], guide_dtype)
        positive_mask = torch.zeros(n_queries, n_docs, dtype=torch.bool, device=queries.device)
        positive_mask[rows, positive_index] = True
        guide_masks["query_to_doc"] = (guide_q @ guide_d.T > threshold) & ~positive_mask
        guide_masks["query_to_query"] = guide_q @ guide_q.T > threshold
        guide_masks["doc_to_doc"] = guide_p @ guide_d[:n_world].T > threshold
        if objective.guide_exclude_self:  # sentence-transformers >= 6.3: no self-negative in either block
            guide_masks["query_to_query"][rows, rows] = True
            guide_masks["doc_to_doc"][rows, local] = True
    own_docs = torch.eye(n_world, dtype=torch.bool, device=queries.device)[local].repeat(1, max(n_docs // n_world, 1))
    teacher_logits = None
    losses = queries.new_zeros(n_layers, len(dims))
    distill = queries.new_zeros(n_layers, len(dims))
    order = [(n_layers - 1, len(dims) - 1)] if objective.distill_weights is not None else []
    order += [(layer, m) for layer in range(n_layers) for m in range(len(dims)) if active[layer][m]]
    for layer, m in order:
        dim = dims[m]
        q_all = world_queries[layer, :, :dim]
        k_all = world_docs[layer, :, :dim]
        q_loc, k_pos = queries[layer, :, :dim], world_docs[layer, positive_index, :dim]
        if objective.similarity == "cos":
            q_all, k_all = F.normalize(q_all, dim=-1), F.normalize(k_all, dim=-1)
            q_loc, k_pos = F.normalize(q_loc, dim=-1), F.normalize(k_pos, dim=-1)
        blocks = {"query_to_doc": q_loc @ k_all.T}
        if "query_to_query" in directions:
            if guide_masks:
                blocks["query_to_query"] = q_loc @ q_loc.T
            else:
                blocks["query_to_query"] = (q_loc @ q_all.T).index_put((rows, local), torch.tensor(-torch.inf,
                                                                                                   dtype=q_loc.dtype))
        if "doc_to_query" in directions:
            blocks["doc_to_query"] = (q_all @ k_pos.T).T
        if "doc_to_doc" in directions:
            if guide_masks:
                blocks["doc_to_doc"] = k_pos @ k_all[:n_world].T
            else:
                blocks["doc_to_doc"] = (k_all @ k_pos.T).T.masked_fill(own_docs, -torch.inf)
        penalty = None
        if objective.hardness_mode is not None and objective.hardness_strength > 0:
            penalty = objective.hardness_strength * blocks["query_to_doc"].detach()
            if objective.hardness_mode == "hard_negatives":
                keep = own_docs.clone()
                keep[:, :n_world] = False
            elif objective.hardness_mode == "in_batch_negatives":
                keep = ~own_docs
            else:
                keep = torch.ones_like(own_docs)
                keep[rows, local] = False
            penalty = torch.where(keep, penalty, 0.0)
        for name in blocks:
            blocks[name] = blocks[name] * scale
            if name in guide_masks:
                blocks[name] = blocks[name].masked_fill(guide_masks[name], -torch.inf)
        if penalty is not None:
            blocks["query_to_doc"] = blocks["query_to_doc"] + penalty
        positive = blocks["query_to_doc"][rows, positive_index]
        if objective.partition_mode == "joint":
            scores = torch.cat(list(blocks.values()), dim=1)
            log_z = torch.logsumexp(scores, dim=1)
        else:
            log_z = sum(torch.logsumexp(block, dim=1) for block in blocks.values()) / len(blocks)
        if active[layer][m]:
            losses[layer, m] = (log_z - positive).mean()
        if objective.distill_weights is not None:
            log_p = scores - log_z[:, None]
            if teacher_logits is None:
                teacher_logits = log_p.detach()
            if active[layer][m]:
                p_teacher = teacher_logits.exp()
                finite = torch.isfinite(teacher_logits)
                terms = torch.where(finite, p_teacher * (teacher_logits - log_p), 0.0)
                distill[layer, m] = terms.sum(1).mean()
    return losses, distill
