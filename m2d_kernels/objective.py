"""The loss family as passes with rules: MultipleNegativesRankingLoss's directions and partitions,
hardness weighting, dot similarity, guided false-negative filtering and score distillation.

Each direction is one rows-vs-columns pass (:mod:`m2d_kernels.rules`) of the backend's kernels:

    query_to_doc    rows: local queries    columns: all docs         positives; hardness penalty
    query_to_query  rows: local queries    columns: all queries      the row itself excluded
    doc_to_query    rows: local positives  columns: all queries
    doc_to_doc      rows: local positives  columns: all docs         the row's own documents excluded

(with a guide, GISTEmbedLoss's blocks: query_to_query against the local queries and doc_to_doc against
all positives, the row itself excluded unless ``guide_exclude_self`` is off). A pass returns
per-row statistics relative to an offset; a ``"joint"`` partition combines them into one softmax per row
(``o = max o_p``, ``log_sum = log sum_p exp(l_p + o_p - o)``), ``"per_direction"`` averages the
per-pass log-sum-exps. The backward calls every pass's ``pass_gradients`` with the statistics its
softmax had (combined or its own), so nothing of size ``B x N`` is stored: only ``[L, B, M]`` tables.

A joint partition in the default layout (one process's columns, no guide or teacher) shares tiles
instead (``_shared_passes``): doc_to_query is query_to_doc's column statistics, query_to_query and the
positives' square of doc_to_doc are triangles; about 2x query_to_doc's FLOPs instead of 3x at N = 2B.
With query_to_query they are one triangle pass over ``X = [queries; docs]`` (``_merged_pass``), whose
rows and columns ``i`` and ``B + i`` are both anchor ``i``'s: one launch instead of three.

Score distillation (Starbucks): the teacher is the pair (L - 1, M - 1) of the same call, detached; every
pass accumulates ``sum_j exp(z_T - o_T) z_lm`` beside its log-sum-exp, which gives
``KL_lm(i) = (E_pT[z_T] - LSE_T) - (E_pT[z_lm] - LSE_lm)`` without a second pass; its gradient is
``p_lm - p_T`` per logit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from m2d_kernels.backends.base import Softmax, combine
from m2d_kernels.numerics import (
    accumulator_dtype,
    device_table,
    first_order_only,
    inverse_prefix_norms,
    positive_logit_gradients,
)
from m2d_kernels.rules import PENALTIES, Rules, guide_tie_tolerance

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = PENALTIES  # MultipleNegativesRankingLoss's hardness modes are the rules' penalties
MARGIN_STRATEGIES = ("absolute", "relative")


@dataclass(frozen=True, eq=False)
class Objective:
    """The options of one call beyond the (layer, dim) grid (validated by ``functional``)."""

    directions: tuple[str, ...] = ("query_to_doc",)
    partition_mode: str = "joint"
    similarity: str = "cos"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    guide_queries: torch.Tensor | None = None  # [B, Dg]
    guide_docs: torch.Tensor | None = None  # [N, Dg]
    guide_margin: float = 0.0
    guide_margin_strategy: str = "absolute"
    # With a guide, whether the anchor-anchor / positive-positive blocks drop the row itself
    # (sentence-transformers >= 6.3) or leave it to the guide (6.0-6.2).
    guide_exclude_self: bool = True
    distill_weights: tuple[tuple[float, ...], ...] | None = None  # [L, M]

    @property
    def hardness(self) -> bool:
        return self.hardness_mode is not None and self.hardness_strength > 0

    @property
    def is_default(self) -> bool:
        """The default options, MultipleNegativesRankingLoss's plain InfoNCE: query_to_doc, optionally with
        a per-direction doc_to_query (``symmetric=True``); cosine; no hardness, guide or distillation. Only
        these take a learnable scale and the ring exchange."""
        if self.similarity != "cos" or self.hardness or self.guide_queries is not None or self.distill_weights:
            return False
        return self.directions == ("query_to_doc",) or (
            self.directions == ("query_to_doc", "doc_to_query") and self.partition_mode == "per_direction")


@dataclass(frozen=True)
class Losses:
    """What :func:`objective_losses` returns, each ``[L, M]`` (0 for an inactive pair)."""

    losses: torch.Tensor  # mean over the local rows of each pair's loss
    distill: torch.Tensor | None = None  # the distillation terms (distill_weights), else None
    # d losses / d scale (scale_slope: a learnable temperature), detached; else None.
    scale_slope: torch.Tensor | None = None


def objective_losses(impl: ModuleType, queries, docs, dims, active, scale, positive_index, objective: Objective,
                     gather: bool = False, leading_positives: bool = False,
                     scale_param: torch.Tensor | None = None) -> Losses:
    """The ``[L, M]`` losses of ``objective`` by the passes of backend ``impl``; ``gather``: against the
    queries and docs of all ranks (all-gather). ``leading_positives``: ``positive_index`` is ``arange(B)``
    (the default layout), which lets directions share tiles. ``scale_param``: a learnable scale (its value
    is ``scale``): the passes also return ``d losses / d scale`` (the default options only); the reference
    oracle differentiates through it instead."""
    scale_slope = scale_param is not None
    world_queries, world_docs, rank_offset, positives = queries, docs, 0, positive_index
    guide_docs = objective.guide_docs
    if gather:
        from m2d_kernels import distributed

        world_size, rank = distributed.world_size_and_rank()
        if world_size > 1:
            group = distributed.dist.group.WORLD
            n_queries = queries.shape[1]
            world_queries = distributed.gather_queries(queries, group)
            world_docs = distributed.gather_candidates(docs, n_queries, group)
            rank_offset = rank * n_queries
            positives = distributed.gathered_positive_index(positive_index, n_queries, world_size, rank)
            if guide_docs is not None:
                with torch.no_grad():
                    guide_docs = distributed.gather_candidates(guide_docs[None], n_queries, group)[0]
    if getattr(impl, "objective_losses", None) is not None:  # the reference: its own naive oracle
        if guide_docs is not objective.guide_docs:
            objective = dataclasses.replace(objective, guide_docs=guide_docs)
        losses, distill = impl.objective_losses(queries, world_queries, world_docs, rank_offset, positives, dims,
                                                active, scale if scale_param is None else scale_param, objective)
        return Losses(losses, distill if objective.distill_weights is not None else None)
    local = world_queries is queries
    if scale_slope and not objective.is_default:
        raise ValueError("a learnable scale needs the default options (query_to_doc, optionally symmetric; cos; "
                         "no hardness, guide or distillation)")
    if _symmetric_shares_tiles(impl, objective, leading_positives, local, scale):
        passes = [_Pass(queries, docs, torch.arange(queries.shape[1], device=queries.device),
                        Rules(column_statistics=queries.shape[1], scale_slope=scale_slope))]
    elif _shares_tiles(impl, objective, leading_positives, local, scale):
        passes = (_merged_pass(queries, docs, objective) if _merges(objective)
                  else _shared_passes(queries, docs, objective))
    else:
        passes = _passes(queries, docs, world_queries, world_docs, rank_offset, positive_index, positives, objective,
                         guide_docs, scale_slope)
    tensors, specs = _unique_tensors(passes)
    if objective.distill_weights is not None:  # the teacher's statistics are needed, whatever its weight
        active = tuple(tuple(on or (layer == len(active) - 1 and m == len(dims) - 1) for m, on in enumerate(row))
                       for layer, row in enumerate(active))
    losses, distill, slope = _PassesFunction.apply(impl, specs, dims, active, scale, objective.partition_mode,
                                                   objective.distill_weights is not None, queries.shape[1],
                                                   *tensors)
    return Losses(losses, distill if objective.distill_weights is not None else None,
                  slope if scale_slope else None)


@dataclass(frozen=True, eq=False)
class _Pass:
    rows: torch.Tensor
    cols: torch.Tensor
    positives: torch.Tensor  # [R] long, -1 where the row's positive is not among these columns
    rules: Rules
    # The pass's rows are rows[:, :row_limit] (None: all): a prefix of an input, which then stays one
    # autograd input with one norm table.
    row_limit: int | None = None


def _passes(queries, docs, world_queries, world_docs, rank_offset, positive_index, positives, objective, guide_docs,
            scale_slope=False):
    n_queries, n_world = queries.shape[1], world_queries.shape[1]
    device = queries.device
    acc = accumulator_dtype(queries.dtype)
    row_group = torch.arange(n_queries, device=device) + rank_offset
    absent = torch.full_like(row_group, -1)
    teacher = objective.distill_weights is not None
    common = {"similarity": objective.similarity, "teacher": teacher, "scale_slope": scale_slope}
    groups = {"group_period": n_world, "row_group": row_group}
    guide = {}
    if objective.guide_queries is not None:
        guide_q = F.normalize(objective.guide_queries.detach().to(acc), dim=-1)
        guide_d = F.normalize(guide_docs.detach().to(acc), dim=-1)
        guide_p = guide_d[positives]
        threshold = (guide_q * guide_p).sum(-1)
        if objective.guide_margin_strategy == "absolute":
            threshold = threshold - objective.guide_margin
        else:
            threshold = threshold - threshold.abs() * objective.guide_margin
        threshold = threshold + guide_tie_tolerance(guide_q.shape[1], acc)
        guide = {"q": guide_q, "d": guide_d, "p": guide_p, "threshold": threshold}
    # The positives as rows (doc_to_query, doc_to_doc): a gathered copy, only when a direction needs it.
    local_positives = (docs[:, positive_index] if {"doc_to_query", "doc_to_doc"} & set(objective.directions)
                       else None)
    passes = []
    hardness = {"penalty": objective.hardness_mode, "penalty_strength": objective.hardness_strength,
                **groups} if objective.hardness else {}
    guided = (lambda rows, cols: {"guide_rows": guide[rows], "guide_cols": guide[cols],
                                  "guide_threshold": guide["threshold"]}) if guide else None
    passes.append(_Pass(queries, world_docs, positives, Rules(**common, **hardness,
                                                              **(guided("q", "d") if guide else {}))))
    if "query_to_query" in objective.directions:
        if guide:
            # GIST's anchor-anchor block: the local queries only, so the row itself is column i.
            self_excluded = ({"exclude_own_group": True, "group_period": n_queries,
                              "row_group": torch.arange(n_queries, device=device)}
                             if objective.guide_exclude_self else {})
            passes.append(_Pass(queries, queries, absent, Rules(**common, **guided("q", "q"), **self_excluded)))
        else:
            passes.append(_Pass(queries, world_queries, absent, Rules(**common, **groups, exclude_own_group=True)))
    if "doc_to_query" in objective.directions:
        # per_direction: this direction's loss has its own positive term (the same logit as query_to_doc's).
        own = row_group if objective.partition_mode == "per_direction" else absent
        passes.append(_Pass(local_positives, world_queries, own, Rules(**common)))
    if "doc_to_doc" in objective.directions:
        if guide:
            # GIST's positive-positive block: all ranks' positives, the row's own at column rank_offset + i.
            guide_cols = {"guide_rows": guide["p"], "guide_cols": guide["d"][:n_world],
                          "guide_threshold": guide["threshold"]}
            self_excluded = {**groups, "exclude_own_group": True} if objective.guide_exclude_self else {}
            passes.append(_Pass(local_positives, world_docs[:, :n_world], absent,
                                Rules(**common, **guide_cols, **self_excluded)))
        else:
            passes.append(_Pass(local_positives, world_docs, absent, Rules(**common, **groups,
                                                                           exclude_own_group=True)))
    return passes


def _symmetric_shares_tiles(impl, objective, leading_positives, local, scale):
    """Whether the symmetric default loss is one pass: doc_to_query's rows are query_to_doc's first B columns
    (the default layout, one process's columns) and the backend returns their statistics at this scale."""
    return (objective.is_default and len(objective.directions) == 2 and leading_positives and local
            and impl.shares_tiles(objective.similarity, scale))


def _shares_tiles(impl, objective, leading_positives, local, scale):
    """Whether the joint directions can share tiles: a backend with the rules, the default layout, one
    process's columns, and no guide or teacher (whose per-tile data the column side would also need)."""
    return (impl.shares_tiles(objective.similarity, scale) and leading_positives and local
            and len(objective.directions) > 1
            and objective.partition_mode == "joint" and objective.guide_queries is None
            and objective.distill_weights is None)


def _shared_passes(queries, docs, objective):
    """The joint directions as at most three passes, about 2x query_to_doc's FLOPs at N = 2B instead of 3x:

    query_to_doc   Q vs D_all; its first B columns' statistics are doc_to_query's rows (d_j . q_i = s(i, j))
    query_to_query Q vs Q, triangle: each unordered pair once; row i's part is row_i (+) column_i
    doc_to_doc     D+ vs D_all, triangle on the positives' square, own group excluded on the negatives
    """
    n_queries = queries.shape[1]
    row_group = torch.arange(n_queries, device=queries.device)
    absent = torch.full_like(row_group, -1)
    common = {"similarity": objective.similarity}
    hardness = {"penalty": objective.hardness_mode, "penalty_strength": objective.hardness_strength,
                "group_period": n_queries, "row_group": row_group} if objective.hardness else {}
    doc_to_query = n_queries if "doc_to_query" in objective.directions else 0
    passes = [_Pass(queries, docs, row_group, Rules(**common, **hardness, column_statistics=doc_to_query))]
    if "query_to_query" in objective.directions:
        passes.append(_Pass(queries, queries, absent, Rules(**common, triangle=True, column_statistics=n_queries)))
    if "doc_to_doc" in objective.directions:
        passes.append(_Pass(docs, docs, absent,
                            Rules(**common, triangle=True, column_statistics=n_queries, group_period=n_queries,
                                  row_group=row_group, exclude_own_group=True), row_limit=n_queries))
    return passes


def _merges(objective):
    """Whether ``_merged_pass`` computes the shared joint directions: with query_to_query (the queries are
    columns), without a hardness penalty (query_to_doc's alone), and with doc_to_doc only beside doc_to_query
    (the positives' columns take every row above them: the queries' too)."""
    directions = objective.directions
    return ("query_to_query" in directions and not objective.hardness
            and ("doc_to_doc" not in directions or "doc_to_query" in directions))


def _merged_pass(queries, docs, objective):
    """The shared joint directions as one triangle pass over ``X = [queries; docs]`` ``[L, B + N, D]``:

    rows     the queries, then (doc_to_doc) the positives: X[:, :R], R = B or 2B; row i's positive is B + i
    columns  all of X, triangle (j > i): query_to_query's and the positives' squares once, and the
             queries' rows against the positives' columns (query_to_doc), whose column statistics are
             doc_to_query's rows; the positives' rows against the queries' columns are never scored
    column statistics  the first K = B (query_to_query) or 2B (doc_to_query) columns
    doc_to_doc         the positives' rows exclude their own group (period B); the queries' rows own no
                       column (group -1: their positive is in their group), the triangle drops themselves

    Rows and columns ``i`` and ``B + i`` are anchor ``i``'s (``_PassesFunction`` folds them): about 2x
    query_to_doc's FLOPs at N = 2B, the same as ``_shared_passes``, in one launch instead of three."""
    n_queries = queries.shape[1]
    directions = objective.directions
    anchors = torch.arange(n_queries, device=queries.device)
    absent = torch.full_like(anchors, -1)
    both = torch.cat([queries, docs], 1)
    n_rows = 2 * n_queries if "doc_to_doc" in directions else n_queries
    n_columns = 2 * n_queries if "doc_to_query" in directions else n_queries
    positives = anchors + n_queries
    groups = {}
    if "doc_to_doc" in directions:
        positives = torch.cat([positives, absent])
        groups = {"exclude_own_group": True, "group_period": n_queries, "row_group": torch.cat([absent, anchors])}
    rules = Rules(similarity=objective.similarity, triangle=True, column_statistics=n_columns, **groups)
    return [_Pass(both, both, positives, rules, row_limit=n_rows)]


def _unique_tensors(passes):
    """The distinct row/column tensors (autograd inputs) and per pass ``(rows index, cols index, positives, rules,
    row_limit)``."""
    tensors, specs = [], []

    def index(x):
        for i, t in enumerate(tensors):
            if t is x:
                return i
        tensors.append(x)
        return len(tensors) - 1

    for p in passes:
        specs.append((index(p.rows), index(p.cols), p.positives, p.rules, p.row_limit))
    return tensors, specs


def _prefix(x, limit):
    """``x[:, :limit]`` (``limit`` None: x): a pass's rows, or their norm tables."""
    return x if limit is None else x[:, :limit]


def _pass_norms(norms, rows, cols, limit):
    """The pass API's ``norms`` for a pass over tensors ``rows`` / ``cols`` (indices) from the per-tensor
    tables (None: none, "dot")."""
    return norms and (tuple(_prefix(t, limit) for t in norms[rows]), norms[cols])


def _anchor_parts(softmax: Softmax, n_anchors: int) -> list[Softmax]:
    """Statistics ``[L, k * B, M]`` of k row (or column) sets as k parts ``[L, B, M]``, one per set of the
    anchors (``_merged_pass``: rows i and B + i are anchor i's; every other pass has k = 1)."""
    def split(t):
        return [None] * (softmax.offset.shape[1] // n_anchors) if t is None else t.split(n_anchors, 1)

    return [Softmax(*fields) for fields in zip(*(split(t) for t in (softmax.offset, softmax.log_sum,
                                                                      softmax.expected_logit)))]


def _per_row(softmax: Softmax, n_rows: int) -> Softmax:
    """An anchor's ``[L, B, M]`` statistics for each of ``n_rows`` rows (or columns) that are k sets of them."""
    if softmax.offset.shape[1] == n_rows:
        return softmax
    k = n_rows // softmax.offset.shape[1]
    return Softmax(softmax.offset.repeat(1, k, 1), softmax.log_sum.repeat(1, k, 1))


class _PassesFunction(torch.autograd.Function):
    """Losses, distillation terms and the scale's slope ``[L, M]`` from the passes' statistics; backward
    through every pass. The one autograd path of every loss a pass backend computes.

    Each anchor (row of the first pass) has one softmax per part: each pass's rows of it, and the statistic
    columns (``rules.column_statistics``) of its columns. A joint partition combines the parts into one
    softmax; per_direction averages their log-sum-exps, each part keeping its own positive term (the same
    logit: a column part's is its anchor row's positive, whose gradient the passes do not carry, added
    here)."""

    @staticmethod
    def forward(ctx, impl, specs, dims, active, scale, partition_mode, distill, n_anchors, *tensors):
        # Each distinct tensor's inverse-norm tables once, for every pass's forward and backward.
        acc = accumulator_dtype(tensors[0].dtype)
        norms = ([inverse_prefix_norms(t.detach(), dims, acc) for t in tensors]
                 if specs[0][3].similarity == "cos" else None)
        stats = [impl.row_statistics(_prefix(tensors[r], limit), tensors[c], dims, active, scale, positives, rules,
                                     norms=_pass_norms(norms, r, c, limit))
                 for r, c, positives, rules, limit in specs]
        positive = sum(stats[0].positive_logit.split(n_anchors, 1))  # the merged pass: rows B + i have none
        row_parts = [part for s in stats for part in _anchor_parts(s.rows, n_anchors)]
        column_parts = [part for s in stats if s.columns is not None for part in _anchor_parts(s.columns, n_anchors)]
        parts = row_parts + column_parts
        joint = None
        if partition_mode == "joint":
            joint = parts[0]
            for other in parts[1:]:
                joint = combine(joint, other)
            log_z, expected = joint.offset + joint.log_sum, joint.expected_logit
            row_stats = [joint] * len(stats)
        else:
            log_z = sum(part.offset + part.log_sum for part in parts) / len(parts)
            expected = (None if parts[0].expected_logit is None
                        else sum(part.expected_logit for part in parts) / len(parts))
            row_stats = [s.rows for s in stats]
        active_pairs = device_table(active, positive.device)
        losses = torch.where(active_pairs, (log_z - positive).mean(1), 0.0)
        slope = torch.zeros_like(losses)
        if expected is not None:  # d (LSE_i - z_i,p(i)) / d scale = (E_p[z_i] - z_i,p(i)) / scale
            slope = torch.where(active_pairs, ((expected - positive) / scale).mean(1), 0.0)
        distill_terms = torch.zeros_like(losses)
        if distill:
            # sum_j exp(z_T - o_T) z_lm over all passes, relative to the combined teacher offset.
            teacher_offset = joint.offset[-1, :, -1]
            weighted = sum(s.teacher_sum * (s.rows.offset[-1, :, -1] - teacher_offset).exp()[None, :, None]
                           for s in stats)
            expected_lm = weighted * (-joint.log_sum[-1, :, -1]).exp()[None, :, None]  # E_pT[z_lm]
            kl = (expected_lm[-1:, :, -1:] - log_z[-1:, :, -1:]) - (expected_lm - log_z)
            distill_terms = torch.where(active_pairs, kl.mean(1), 0.0)
        # Per pass: the statistics its rows' softmaxes had, and its columns' (joint: the anchors').
        column_stats = [None if s.columns is None else (joint if partition_mode == "joint" else s.columns)
                        for s in stats]
        flat = [t for softmax in row_stats + column_stats if softmax is not None
                for t in (softmax.offset, softmax.log_sum)]
        ctx.save_for_backward(*tensors, *flat)
        ctx.config = (impl, specs, dims, active, scale, len(tensors), distill, partition_mode, n_anchors,
                      len(parts), [softmax is not None for softmax in column_stats])
        ctx.norms = norms
        ctx.mark_non_differentiable(slope)
        if not distill:
            ctx.mark_non_differentiable(distill_terms)
        dtype = tensors[0].dtype
        return losses.to(dtype), distill_terms.to(dtype), slope

    @staticmethod
    def backward(ctx, grad_losses, grad_distill, _grad_slope):
        impl, specs, dims, active, scale, n_tensors, distill, partition_mode, n_anchors, n_parts, has_columns = \
            ctx.config
        saved = ctx.saved_tensors
        tensors, flat = saved[:n_tensors], list(saved[n_tensors:])
        acc = flat[0].dtype

        def take():
            offset, log_sum = flat.pop(0), flat.pop(0)
            return Softmax(offset, log_sum)

        row_stats = [take() for _ in specs]
        column_stats = [take() if present else None for present in has_columns]
        # per_direction: each part's loss counts 1 / n_parts of the pair's.
        share = n_parts if partition_mode == "per_direction" else 1
        coef = grad_losses.to(acc) / n_anchors / share
        distill_coef = grad_distill.to(acc) / n_anchors if distill and grad_distill is not None else None
        grads = [None] * n_tensors
        with torch.no_grad():
            for k, (r, c, positives, rules, limit) in enumerate(specs):
                n_rows = positives.shape[0]
                columns = column_stats[k]
                if columns is not None:
                    columns = _per_row(columns, rules.column_statistics)
                grad = impl.pass_gradients(_prefix(tensors[r].detach(), limit), tensors[c].detach(), dims, active,
                                           scale, positives, _per_row(row_stats[k], n_rows), coef, rules,
                                           distill_coef, columns=columns, norms=_pass_norms(ctx.norms, r, c, limit))
                # The columns first: a whole tensor's gradient, which a prefix of rows then adds to.
                for i, g, rows_limit in ((c, grad.cols, None), (r, grad.rows, limit)):
                    if grads[i] is None and rows_limit is None:
                        grads[i] = g.to(acc)
                        continue
                    if grads[i] is None:
                        grads[i] = tensors[i].new_zeros(tensors[i].shape, dtype=acc)
                    _prefix(grads[i], rows_limit).add_(g.to(acc))
        if partition_mode == "per_direction":
            # A statistic column's own positive term, -coef * z(j, j): the row's positive logit again.
            for k, (r, c, positives, _, limit) in enumerate(specs):
                if column_stats[k] is not None:
                    d_x, d_y = positive_logit_gradients(_prefix(tensors[r].detach(), limit), tensors[c].detach(),
                                                        dims, active, scale, positives, -coef)
                    _prefix(grads[r], limit).add_(d_x)
                    grads[c].add_(d_y)
        grads = [first_order_only(g.to(t.dtype), t) if ctx.needs_input_grad[8 + i] else None
                 for i, (g, t) in enumerate(zip(grads, tensors))]
        return (None,) * 8 + tuple(grads)
