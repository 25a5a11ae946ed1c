"""Cross-device negatives: score local queries against the candidates of every rank.

The "local loss" of open_clip and sentence-transformers' ``gather_across_devices``: rank
``r`` of ``W`` holds queries ``[L, B, D]`` and docs ``[L, N, D]`` laid out as column
groups ``[positives, negatives_1, ...]`` of ``B`` rows each. Its candidates are the docs
of all ranks, gathered with gradient and laid out as sentence-transformers'
MultipleNegativesRankingLoss does: for each column group, the groups of all ranks are
concatenated (all ranks' positives first, then all ranks' first negatives, ...). Local
docs row ``p = g * B + o`` therefore sits at ``g * W * B + r * B + o``; with the default
positives, query ``i`` finds its positive at ``r * B + i``.

Relation to one process on the concatenated batch (queries of ranks 0..W-1 stacked,
docs in the layout above): each rank's loss is a mean over its own ``B`` queries, so

    sum_r loss_r          = W * loss_global
    grad of x on rank r   = W * d loss_global / d x      (after backward of loss_r alone)

because the all-gather's backward is a reduce-scatter that sums the gradients every rank
sends to the owner of a row. DDP averages parameter gradients over ranks, which divides by
``W`` again: one DDP step equals one single-process step on the global batch.

The gather uses PyTorch's autograd-aware functional collectives, which run on NCCL and on
gloo (CPU) alike; under gloo the backward reduce-scatter is emulated by an all-reduce.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

# torch >= 2.13 names it all_gather_single_autograd and deprecates the older name, which
# is the only one torch 2.11 has; both gather along dim 0 and reduce-scatter (sum) in backward.
_all_gather_with_grad = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def world_size_and_rank(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group`` (default: the world), ``(1, 0)`` when not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_layers(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather ``[L, R, D]`` with gradient into ``[W, L, R, D]`` (rank-major)."""
    world_size = dist.get_world_size(group)
    gathered = _all_gather_with_grad(x.contiguous(), 0, group)
    return gathered.view(world_size, *x.shape)


def gather_queries(queries: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[L, B, D]`` per rank -> ``[L, W * B, D]``, rank ``r``'s queries at rows ``r * B ...``."""
    n_layers, _, n_features = queries.shape
    return _gather_layers(queries, group).permute(1, 0, 2, 3).reshape(n_layers, -1, n_features)


def gather_candidates(docs: torch.Tensor, n_queries: int, group: dist.ProcessGroup) -> torch.Tensor:
    """``[L, N, D]`` per rank -> ``[L, W * N, D]`` in sentence-transformers' layout.

    ``N`` must be a multiple of ``n_queries`` (``B``): the docs are ``N / B`` column groups.
    """
    world_size = dist.get_world_size(group)
    n_layers, n_docs, n_features = docs.shape
    n_groups = n_docs // n_queries
    gathered = _gather_layers(docs, group).view(world_size, n_layers, n_groups, n_queries, n_features)
    return gathered.permute(1, 2, 0, 3, 4).reshape(n_layers, world_size * n_docs, n_features)


def gathered_positive_index(positive_index: torch.Tensor, n_queries: int, world_size: int, rank: int) -> torch.Tensor:
    """Map local docs rows ``g * B + o`` to their gathered rows ``g * W * B + rank * B + o``."""
    group_index, offset = positive_index.div(n_queries, rounding_mode="floor"), positive_index.remainder(n_queries)
    return group_index * (world_size * n_queries) + rank * n_queries + offset


def pair_losses_across_devices(
    backend: ModuleType,
    queries: torch.Tensor,
    docs: torch.Tensor,
    dims: tuple[int, ...],
    active: tuple[tuple[bool, ...], ...],
    scale: float,
    positive_index: torch.Tensor,
    symmetric: bool,
    group: dist.ProcessGroup | None = None,
    scale_grad: bool = False,
):
    """``backend.pair_losses`` of the local queries against the candidates of all ranks.

    ``positive_index`` holds local docs rows, as without gathering. ``symmetric`` adds the
    doc-to-query direction with the local positives as rows and the queries of all ranks
    as columns; both directions are plain (non-symmetric) backend calls, averaged, so every
    backend works unchanged. Without an initialised process group, or with one rank, this
    is the local computation. ``scale_grad``: also return ``d loss / d scale`` as the backends do.
    """
    world_size, rank = world_size_and_rank(group)
    if world_size == 1:
        return backend.pair_losses(queries, docs, dims, active, scale, positive_index, symmetric, scale_grad)
    group = group if group is not None else dist.group.WORLD
    n_queries = queries.shape[1]
    world_docs = gather_candidates(docs, n_queries, group)
    world_positive_index = gathered_positive_index(positive_index, n_queries, world_size, rank)
    query_to_doc = backend.pair_losses(queries, world_docs, dims, active, scale, world_positive_index, False,
                                       scale_grad)
    if not symmetric:
        return query_to_doc
    # doc_to_query: local positives against all queries; row i's own query is at rank * B + i.
    world_queries = gather_queries(queries, group)
    own_queries = torch.arange(n_queries, device=queries.device) + rank * n_queries
    positives = docs[:, positive_index]
    doc_to_query = backend.pair_losses(positives, world_queries, dims, active, scale, own_queries, False, scale_grad)
    if scale_grad:
        return tuple((a + b) / 2 for a, b in zip(query_to_doc, doc_to_query))
    return (query_to_doc + doc_to_query) / 2
