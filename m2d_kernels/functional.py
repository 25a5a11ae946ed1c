"""``matryoshka_2d_infonce``: input validation and backend dispatch.

Every input is checked once here, at the boundary, into one frozen :class:`Call`; backends receive
normalised arguments (a tuple of dims, an ``[L][M]`` tuple of active flags, a float scale, a long
``positive_index`` on the embeddings' device) and never re-validate. Every loss then takes one path:
the passes of :mod:`m2d_kernels.objective` (locally, all-gathered, or around the ring), except the
Triton backend's default options, which keep its fused kernels (``pair_losses``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch

from m2d_kernels import backends
from m2d_kernels.numerics import device_table, first_order_only
from m2d_kernels.objective import (
    DIRECTIONS,
    HARDNESS_MODES,
    MARGIN_STRATEGIES,
    PARTITION_MODES,
    Objective,
    objective_losses,
)
from m2d_kernels.rules import SIMILARITIES

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("sum", "none")
GATHER_MODES = ("all_gather", "ring")  # m2d_kernels.distributed.MODES, without importing torch.distributed


def matryoshka_2d_infonce(
    queries: torch.Tensor,
    docs: torch.Tensor,
    dims: Sequence[int],
    weights: torch.Tensor | Sequence[Sequence[float]] | None = None,
    *,
    scale: float = 20.0,
    positive_index: torch.Tensor | None = None,
    symmetric: bool = False,
    directions: Sequence[str] | None = None,
    partition_mode: str = "joint",
    similarity: str = "cos",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    guide: tuple[torch.Tensor, torch.Tensor] | None = None,
    guide_margin: float = 0.0,
    guide_margin_strategy: str = "absolute",
    guide_exclude_self: bool = True,
    distill_weights: torch.Tensor | Sequence[Sequence[float]] | None = None,
    reduction: str = "sum",
    backend: str = "auto",
    check_finite: bool = False,
    gather_across_devices: bool | str = False,
) -> torch.Tensor:
    """In-batch InfoNCE on truncated, re-normalised embeddings for all (layer, dim) pairs.

    Args:
        queries: ``[L, B, D]`` pooled anchor embeddings, one slice per selected layer
            (not normalised).
        docs: ``[L, N, D]`` candidates of the same layers, ``N >= B``. The positive of
            query ``i`` is ``docs[:, i]`` unless ``positive_index`` says otherwise; the
            other rows are in-batch and hard negatives.
        dims: strictly increasing nested truncation sizes ``d_1 < ... < d_M <= D``.
        weights: ``[L, M]`` non-negative pair weights (default all ones); a zero entry
            means the pair is not computed. A tensor is read once on the host (a CUDA tensor
            costs one copy). A tensor that requires grad (learned pair weights) gets
            ``d total / d weights = `` the pair-loss matrix, so then every pair is computed.
        scale: inverse temperature applied to the cosine similarities (> 0, finite): a number,
            or a one-element tensor. A tensor that requires grad (a learnable temperature,
            e.g. ``logit_scale.exp()``) receives its gradient; its value is read once per call
            (one device sync for a CUDA tensor). Exact up to 1e8 for fp16/bf16/fp32 inputs and
            1e16 for fp64 (README, *Accuracy*).
        positive_index: ``[B]`` long tensor on the embeddings' device, the row of
            ``docs`` holding each query's positive.
        symmetric: also add the doc-to-query direction (the B positives against all
            queries) and average the two directions, as sentence-transformers'
            MultipleNegativesRankingLoss with ``directions=("query_to_doc",
            "doc_to_query")`` and ``partition_mode="per_direction"``.
        directions: sentence-transformers' MultipleNegativesRankingLoss directions, any of
            ``"query_to_doc"`` (required), ``"query_to_query"`` (the query itself excluded),
            ``"doc_to_query"`` (the positives as rows, all queries as columns) and ``"doc_to_doc"``
            (the positives against all docs, the query's own documents excluded). Default
            ``("query_to_doc",)``, or the two of ``symmetric``. ``doc_to_doc`` and the hardness modes
            need the default layout (``positive_index=None``, ``N`` a multiple of ``B``: the
            positives, then each hard-negative column).
        partition_mode: ``"joint"`` (one softmax per query over every direction's columns) or
            ``"per_direction"`` (the mean of per-direction losses; only with query_to_doc and
            doc_to_query), as MultipleNegativesRankingLoss.
        similarity: ``"cos"`` (re-normalised prefixes) or ``"dot"`` (sentence-transformers'
            ``dot_score`` of the truncated vectors, no re-normalisation).
        hardness_mode, hardness_strength: MultipleNegativesRankingLoss's hardness weighting:
            ``alpha * stop_grad(sim)`` added to the query_to_doc logits of the in-batch negatives
            (``"in_batch_negatives"``), the query's own hard negatives (``"hard_negatives"``) or both
            (``"all_negatives"``), ``alpha = hardness_strength >= 0``; a non-zero strength needs a mode.
        guide: ``(guide_queries [B, Dg], guide_docs [N, Dg])``, a guide model's pooled embeddings
            (no gradient): GISTEmbedLoss's false-negative filtering. Candidate ``j`` of query ``i``
            is dropped when ``guide_cos(i, j) > g_i - guide_margin`` (``guide_margin_strategy=
            "absolute"``) or ``> g_i - |g_i| * guide_margin`` (``"relative"``), with
            ``g_i = guide_cos(query_i, positive_i)``; the positive is never dropped, and a candidate
            whose guide cosine equals ``g_i`` up to rounding (``Dg * eps`` of the accumulator: a
            duplicate of the positive) ties with it and is kept, as sentence-transformers keeps exact
            ties. With a guide, ``query_to_query`` scores the local queries and ``doc_to_doc`` the
            positives only (GIST's anchor-anchor and positive-positive blocks); GIST's ``temperature``
            is ``1 / scale``. The margin options need a guide.
        guide_exclude_self: with a guide, drop the row itself from the anchor-anchor and
            positive-positive blocks (sentence-transformers >= 6.3, the default); ``False`` leaves it to
            the guide, as sentence-transformers 6.0-6.2 did.
        distill_weights: ``[L, M]`` non-negative: adds ``distill_weights[l, m] * mean_i KL(p_T(i) ||
            p_lm(i))``, the teacher ``p_T`` being the softmax of pair (L - 1, M - 1) of this call
            (last layer, largest dim), detached (Starbucks' score distillation). Needs
            ``partition_mode="joint"`` when several directions are selected (with one direction the
            two partitions are the same softmax).
        reduction: ``"sum"`` returns ``sum_{l,m} weights[l, m] * loss_lm`` (plus the distillation
            terms); ``"none"`` returns the ``[L, M]`` matrix of unweighted ``loss_lm`` (0 where the
            weight is 0), or with ``distill_weights`` the pair ``(losses, distill)`` of ``[L, M]``
            matrices (``distill`` unweighted, 0 where its weight is 0).
        backend: ``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"`` or ``"reference"``.
        check_finite: ``True`` raises on NaN/Inf embeddings or guide embeddings (costs a device
            sync). Otherwise NaN propagates to the loss (a NaN guide cosine drops nothing).
        gather_across_devices: under ``torch.distributed``, score the local queries
            against the docs of all ranks, gathered with gradient in sentence-transformers'
            layout (for each group of ``B`` docs rows ``[positives, negatives_1, ...]``, the
            groups of all ranks in rank order), so ``N`` must be a multiple of ``B`` and
            equal on all ranks. ``positive_index`` keeps indexing the local docs.
            ``symmetric`` scores the local positives against the queries of all ranks. The
            result is still a mean over the local queries: the sum over ranks is ``W`` times
            the loss of one process on the concatenated batch (see
            :mod:`m2d_kernels.distributed`). Without an initialised process group, or with
            one rank, the computation is local. ``True`` or ``"all_gather"`` all-gathers the
            docs (``2 x W x L x N x D`` elements per rank); ``"ring"`` passes them around the
            ranks block by block with the same result and memory independent of ``W``
            (needs equal shapes on all ranks and a fixed ``scale``; README, *Multi-device training*).

    Returns:
        A scalar (``"sum"``) or an ``[L, M]`` tensor (``"none"``) in the input dtype.
    """
    call = _validate(queries, docs, dims, weights, scale, positive_index, symmetric, reduction, check_finite,
                     gather_across_devices)
    objective = _validate_objective(queries, docs, call, symmetric, directions, partition_mode, similarity,
                                    hardness_mode, hardness_strength, guide, guide_margin, guide_margin_strategy,
                                    guide_exclude_self, distill_weights, check_finite)
    result = _losses(queries, docs, call, objective, backend)
    if torch.is_grad_enabled() and (queries.requires_grad or docs.requires_grad):
        # No pair computed (all weights 0): the result still belongs to the graph, with a zero gradient.
        if isinstance(result, tuple):
            return tuple(_InGraph.apply(r, queries, docs) if not r.requires_grad else r for r in result)
        if not result.requires_grad:
            return _InGraph.apply(result, queries, docs)
    return result


@dataclass(frozen=True, eq=False)
class Call:
    """The (layer, dim) grid and the call's options, validated and normalised once (``_validate``)."""

    dims: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]  # [L][M] host floats (a tensor's values, read once)
    weights_param: torch.Tensor | None  # the weights when they require grad (learned pair weights)
    scale: float
    scale_param: torch.Tensor | None  # the scale when it requires grad (a learnable temperature)
    positive_index: torch.Tensor  # [B] long on the embeddings' device
    leading_positives: bool  # positive_index was not given: arange(B), the default layout
    reduction: str
    gather: str | None  # None, "all_gather" or "ring"


def _losses(queries, docs, call: Call, objective: Objective, backend: str):
    """The loss (``"sum"``) or the ``[L, M]`` matrix (``"none"``) of one validated call."""
    distill = objective.distill_weights
    # Learned weights need every pair's loss (d total / d weights[l, m] = loss_lm, also where w = 0); the
    # distillation needs the pairs it weighs.
    active = tuple(tuple(call.weights_param is not None or w > 0 or (distill is not None and d > 0)
                         for w, d in zip(row, distill[layer] if distill is not None else row))
                   for layer, row in enumerate(call.weights))
    scale_grad = call.scale_param is not None and torch.is_grad_enabled()
    if scale_grad and not objective.is_default:
        raise ValueError("a learnable scale (a tensor that requires grad) is supported only with the default "
                         "options (query_to_doc, optionally symmetric; cos; no hardness, guide or distillation)")
    impl = backends.resolve(backend, queries.device, queries.dtype)
    symmetric = "doc_to_query" in objective.directions
    distill_terms = slope = None
    if call.gather == "ring":
        if not objective.is_default:
            raise ValueError("gather_across_devices='ring' is supported only with the default options; use "
                             "gather_across_devices=True (all-gather)")
        if scale_grad:
            raise ValueError("gather_across_devices='ring' needs a fixed scale (a number or a tensor without "
                             "grad); use gather_across_devices='all_gather' to learn the scale")
    from_fused = getattr(impl, "pair_losses", None) is not None and objective.is_default and call.gather != "ring"
    if from_fused:  # Triton's tuned kernels for the default options
        if call.gather:
            from m2d_kernels import distributed  # torch.distributed only when asked for: not every build has it

            out = distributed.pair_losses_across_devices(impl, queries, docs, call.dims, active, call.scale,
                                                         call.positive_index, symmetric, scale_grad=scale_grad)
        else:
            out = impl.pair_losses(queries, docs, call.dims, active, call.scale, call.positive_index, symmetric,
                                   scale_grad)
        losses, slope = out if scale_grad else (out, None)
    elif call.gather == "ring" and _world_size() > 1:
        from m2d_kernels import distributed

        losses = distributed.ring_losses(impl, queries, docs, call.dims, active, call.scale, call.positive_index,
                                         symmetric)
    else:
        result = objective_losses(impl, queries, docs, call.dims, active, call.scale, call.positive_index, objective,
                                  gather=call.gather == "all_gather", leading_positives=call.leading_positives,
                                  scale_param=call.scale_param if scale_grad else None)
        losses, distill_terms, slope = result.losses, result.distill, result.scale_slope
    if slope is not None:
        losses = _ScaleGradient.apply(losses, slope, call.scale_param)
    weight_tensor = (call.weights_param.to(device=losses.device, dtype=losses.dtype) if call.weights_param is not None
                     else device_table(call.weights, losses.device, losses.dtype))
    if call.weights_param is None and distill is not None:  # pairs computed only for the distillation report 0
        losses = torch.where(weight_tensor > 0, losses, 0.0)
    if distill is not None:
        distill_tensor = device_table(distill, losses.device, losses.dtype)
        distill_terms = torch.where(distill_tensor > 0, distill_terms, 0.0)
    if call.reduction == "none":
        return losses if distill is None else (losses, distill_terms)
    total = (losses * weight_tensor).sum()
    return total if distill is None else total + (distill_terms * distill_tensor).sum()


def _world_size() -> int:
    """The number of ranks of an initialised default process group, else 1."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _validate_objective(queries, docs, call: Call, symmetric, directions, partition_mode, similarity, hardness_mode,
                        hardness_strength, guide, guide_margin, guide_margin_strategy, guide_exclude_self,
                        distill_weights, check_finite) -> Objective:
    """The options beyond the (layer, dim) grid, checked and normalised into an Objective."""
    dims, scale, positive_index_given = call.dims, call.scale, not call.leading_positives
    n_layers, n_queries, _ = queries.shape
    n_docs = docs.shape[1]
    if directions is None:
        directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
        if symmetric:
            partition_mode = "per_direction"
    elif symmetric:
        raise ValueError("give either symmetric=True or directions, not both (symmetric=True is directions="
                         "('query_to_doc', 'doc_to_query') with partition_mode='per_direction')")
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise TypeError(f"directions must be a sequence of direction names, got {type(directions).__name__}")
    directions = tuple(directions)
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {directions!r}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"directions must not repeat a direction, got {directions!r}")
    if "query_to_doc" not in directions:
        raise ValueError(f"directions must include 'query_to_doc' (it holds the positive pair), got {directions!r}")
    directions = tuple(d for d in DIRECTIONS if d in directions)  # the order does not change the loss
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {partition_mode!r}")
    if len(directions) == 1:
        partition_mode = "joint"  # one direction: both partitions are its one softmax
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError("partition_mode='per_direction' is defined only for 'query_to_doc' and 'doc_to_query' "
                         f"(each direction's softmax must hold the positive), got directions={directions!r}; use "
                         "partition_mode='joint'")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be None or one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if not isinstance(hardness_strength, Real) or isinstance(hardness_strength, bool) or not (
            math.isfinite(hardness_strength) and hardness_strength >= 0):
        raise ValueError(f"hardness_strength must be a finite non-negative number, got {hardness_strength!r}")
    if hardness_mode is None and hardness_strength != 0:
        raise ValueError(f"hardness_strength={hardness_strength!r} needs a hardness_mode (one of {HARDNESS_MODES})")
    # Logit differences reach 2 (scale + strength): keep them, and the loss, finite in the accumulator.
    accumulator = torch.float64 if queries.dtype == torch.float64 else torch.float32
    limit = torch.finfo(accumulator).max / 16
    if scale + hardness_strength > limit:
        raise ValueError(f"scale + hardness_strength must be at most {limit:.3g} for {queries.dtype} inputs (the "
                         f"{accumulator} accumulator), got scale={scale!r}, hardness_strength={hardness_strength!r}")
    if not isinstance(guide_margin, Real) or isinstance(guide_margin, bool) or not math.isfinite(guide_margin):
        raise ValueError(f"guide_margin must be a finite number, got {guide_margin!r}")
    if guide_margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(f"guide_margin_strategy must be one of {MARGIN_STRATEGIES}, got {guide_margin_strategy!r}")
    if not isinstance(guide_exclude_self, bool):
        raise TypeError(f"guide_exclude_self must be a bool, got {type(guide_exclude_self).__name__}")
    if guide is None:
        given = [name for name, value, default in (("guide_margin", guide_margin, 0.0),
                                                   ("guide_margin_strategy", guide_margin_strategy, "absolute"),
                                                   ("guide_exclude_self", guide_exclude_self, True))
                 if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} apply to a guide (GISTEmbedLoss's filtering); pass guide=")
    needs_groups = "doc_to_doc" in directions or (hardness_mode is not None and hardness_strength > 0)
    if needs_groups and (positive_index_given or n_docs % n_queries != 0):
        raise ValueError("doc_to_doc and hardness_mode need sentence-transformers' layout: positive_index=None and "
                         f"docs rows N a multiple of queries B (positives, then hard-negative columns), got "
                         f"N={n_docs}, B={n_queries}, positive_index {'given' if positive_index_given else 'None'}")
    guide_queries = guide_docs = None
    if guide is not None:
        if not (isinstance(guide, (tuple, list)) and len(guide) == 2
                and all(isinstance(g, torch.Tensor) for g in guide)):
            raise TypeError("guide must be a pair of tensors (guide_queries [B, Dg], guide_docs [N, Dg])")
        guide_queries, guide_docs = guide
        if guide_queries.dim() != 2 or guide_docs.dim() != 2 or guide_queries.shape[0] != n_queries or \
                guide_docs.shape[0] != n_docs or guide_queries.shape[1] != guide_docs.shape[1]:
            raise ValueError(f"guide must be (guide_queries [B={n_queries}, Dg], guide_docs [N={n_docs}, Dg]), got "
                             f"shapes {tuple(guide_queries.shape)} and {tuple(guide_docs.shape)}")
        if guide_queries.device != queries.device or guide_docs.device != queries.device:
            raise ValueError(f"guide tensors must be on the embeddings' device {queries.device}")
        if not (guide_queries.is_floating_point() and guide_docs.is_floating_point()):
            raise TypeError("guide tensors must be floating point")
        if "doc_to_query" in directions:
            raise ValueError("guide (GISTEmbedLoss) has no doc_to_query block; use directions among query_to_doc, "
                             "query_to_query, doc_to_doc")
        if check_finite:
            for name, g in (("guide_queries", guide_queries), ("guide_docs", guide_docs)):
                if not torch.isfinite(g).all():
                    raise ValueError(f"guide ({name}) contains NaN or Inf values")
    if distill_weights is not None:
        shape = (n_layers, len(dims))
        if isinstance(distill_weights, torch.Tensor):
            if distill_weights.requires_grad:
                raise ValueError("distill_weights must not require grad")
            distill_weights = distill_weights.detach().cpu().tolist()
        try:
            distill_weights = tuple(tuple(float(w) for w in row) for row in distill_weights)
        except (TypeError, ValueError) as error:
            raise TypeError(f"distill_weights must be a tensor or nested sequence of numbers of shape {shape}") \
                from error
        if len(distill_weights) != n_layers or any(len(row) != len(dims) for row in distill_weights):
            raise ValueError(f"distill_weights must have shape [L, M] = {shape}")
        if not all(math.isfinite(w) and w >= 0 for row in distill_weights for w in row):
            raise ValueError(f"distill_weights must be finite and non-negative, got {distill_weights}")
        if partition_mode == "per_direction" and len(directions) > 1:
            raise ValueError("distill_weights needs partition_mode='joint' when several directions are selected")
    return Objective(directions, partition_mode, similarity, hardness_mode, float(hardness_strength), guide_queries,
                     guide_docs, float(guide_margin), guide_margin_strategy, guide_exclude_self, distill_weights)


class _InGraph(torch.autograd.Function):
    """Identity on a result that no input reached, attached to the inputs with a zero gradient (None)."""

    @staticmethod
    def forward(ctx, result, queries, docs):
        return result.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScaleGradient(torch.autograd.Function):
    """Identity on the pair losses that also hands ``scale`` its gradient,
    ``sum_lm grad_lm * d loss_lm / d scale``, from the slope the backend computed in its forward."""

    @staticmethod
    def forward(ctx, losses, dloss_dscale, scale):
        ctx.save_for_backward(dloss_dscale, scale)
        return losses.clone()

    @staticmethod
    def backward(ctx, grad_losses):
        dloss_dscale, scale = ctx.saved_tensors
        grad_scale = (grad_losses.detach().to(dloss_dscale.dtype) * dloss_dscale).sum()
        # The slope carries no graph: a second derivative with respect to scale must raise, not be wrong.
        grad_scale = first_order_only(grad_scale.to(device=scale.device, dtype=scale.dtype).reshape(scale.shape), scale)
        return grad_losses, None, grad_scale


def validate_dims(dims) -> tuple[int, ...]:
    """``dims`` as a tuple of strictly increasing positive ints, or a TypeError/ValueError naming ``dims``."""
    if isinstance(dims, torch.Tensor):
        dims = dims.tolist()
    if isinstance(dims, (int, str)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of ints, got {type(dims).__name__}")
    if len(dims) == 0 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    dims = tuple(int(d) for d in dims)
    if dims[0] < 1 or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"dims must be strictly increasing positive ints, got {dims}")
    return dims


def _validate(queries, docs, dims, weights, scale, positive_index, symmetric, reduction, check_finite,
              gather_across_devices) -> Call:
    """The inputs and the (layer, dim) grid, checked and normalised (TypeError/ValueError naming the argument)."""
    scale_param = scale if isinstance(scale, torch.Tensor) and scale.requires_grad else None
    weights_param = weights if isinstance(weights, torch.Tensor) and weights.requires_grad else None
    leading_positives = positive_index is None
    for name, x in (("queries", queries), ("docs", docs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"{name} must have shape [L, rows, D] (layers, rows, features), got shape {tuple(x.shape)}; "
                "use x.unsqueeze(0) for a single layer"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if docs.dtype != queries.dtype:
        raise TypeError(f"queries and docs must have the same dtype, got {queries.dtype} and {docs.dtype}")
    if docs.device != queries.device:
        raise ValueError(f"queries and docs must be on the same device, got {queries.device} and {docs.device}")
    n_layers, n_queries, n_features = queries.shape
    if docs.shape[0] != n_layers:
        raise ValueError(f"queries and docs must have the same number of layers L, got {n_layers} and {docs.shape[0]}")
    if docs.shape[2] != n_features:
        raise ValueError(f"queries and docs must have the same feature size D, got {n_features} and {docs.shape[2]}")
    if n_layers == 0 or n_queries == 0 or n_features == 0:
        raise ValueError(f"queries must be non-empty, got shape {tuple(queries.shape)}")
    if docs.shape[1] < n_queries:
        raise ValueError(f"docs must have at least as many rows N as queries B, got N={docs.shape[1]} < B={n_queries}")

    dims = validate_dims(dims)
    if dims[-1] > n_features:
        raise ValueError(f"dims must not exceed the feature size D={n_features}, got {dims}")

    # Weights become a tuple of Python floats: no tensor work, so torch.compile traces it.
    shape = (n_layers, len(dims))
    if weights is None:
        weights = ((1.0,) * len(dims),) * n_layers
    else:
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 2:
                raise ValueError(f"weights must have shape [L, M] = {shape}, got {tuple(weights.shape)}")
            weights = weights.detach().cpu().tolist()  # [L, M] is tiny; a CUDA tensor costs one copy
        try:
            weights = tuple(tuple(float(w) for w in row) for row in weights)
        except (TypeError, ValueError) as error:
            raise TypeError(f"weights must be a tensor or nested sequence of numbers of shape {shape}") from error
        row_lengths = sorted({len(row) for row in weights})
        if len(weights) != n_layers or row_lengths != [len(dims)]:
            raise ValueError(
                f"weights must have shape [L, M] = {shape}, got {len(weights)} rows of lengths {row_lengths}"
            )
        if not all(math.isfinite(w) and w >= 0 for row in weights for w in row):
            raise ValueError(f"weights must be finite and non-negative, got {weights}")

    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise TypeError(f"scale must be a number or a one-element tensor, got a tensor of shape "
                            f"{tuple(scale.shape)}")
        scale = scale.item()
    if not isinstance(scale, Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale}")

    if positive_index is None:
        positive_index = torch.arange(n_queries, device=queries.device)
    else:
        if not isinstance(positive_index, torch.Tensor) or positive_index.dtype != torch.long:
            got = getattr(positive_index, "dtype", type(positive_index).__name__)
            raise TypeError(f"positive_index must be a torch.long tensor, got {got}")
        if tuple(positive_index.shape) != (n_queries,):
            raise ValueError(f"positive_index must have shape [B] = ({n_queries},), got {tuple(positive_index.shape)}")
        positive_index = positive_index.contiguous()  # a column of a stacked index, or an expanded one
        if positive_index.device != queries.device:
            raise ValueError(
                f"positive_index must be on the embeddings' device {queries.device}, got {positive_index.device}"
            )
        # Reading the values syncs once (a GPU index); torch.compile cannot trace it and a CUDA graph cannot
        # capture it, so there the kernels trust the index.
        capturing = positive_index.is_cuda and torch.cuda.is_current_stream_capturing()
        if not (torch.compiler.is_compiling() or capturing):
            low, high = torch.stack([positive_index.min(), positive_index.max()]).tolist()
            if low < 0 or high >= docs.shape[1]:
                raise ValueError(f"positive_index values must be in [0, N={docs.shape[1]}), got range [{low}, {high}]")

    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not isinstance(gather_across_devices, (bool, str)):
        raise TypeError(f"gather_across_devices must be a bool or one of {GATHER_MODES}, got "
                        f"{type(gather_across_devices).__name__}")
    if isinstance(gather_across_devices, str) and gather_across_devices not in GATHER_MODES:
        raise ValueError(f"gather_across_devices must be a bool or one of {GATHER_MODES}, "
                         f"got {gather_across_devices!r}")
    if gather_across_devices and docs.shape[1] % n_queries != 0:
        raise ValueError(
            f"gather_across_devices needs docs rows N to be a multiple of queries B (groups of B rows: positives, "
            f"then each hard negative column), got N={docs.shape[1]}, B={n_queries}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    if check_finite:
        for name, x in (("queries", queries), ("docs", docs)):
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} contains NaN or Inf values")
    gather = "all_gather" if gather_across_devices is True else (gather_across_devices or None)
    return Call(dims, weights, weights_param, scale, scale_param, positive_index, leading_positives, reduction, gather)
