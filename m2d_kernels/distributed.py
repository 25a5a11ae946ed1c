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

``"ring"`` computes the same losses and gradients without ever holding more than two
candidate blocks: each rank keeps its rows and passes the column block ``[L, N, D]`` it
holds to rank ``r + 1`` while it scores the current one (``batch_isend_irecv``, two
buffers), ``W - 1`` times, folding every (layer, dim) pair's per-row softmax statistics
``(offset, log_sum)`` of each block into running ones with the backend's pass
(``backends/base.py``). The positive of a row lies in the rank's own block, scored at
step 0. The backward circulates the blocks again, each followed by its gradient
accumulator: every rank adds its block gradient (computed with the combined statistics)
and forwards it; after ``W`` steps the accumulator of each block, now summed over all
ranks' losses, reaches its owner. That sum is the all-gather's reduce-scatter, so both
modes give the same numbers. The column order of the softmax does not matter; only the
positive's position does, and it is local in both.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from m2d_kernels.backends.base import Softmax, combine
from m2d_kernels.numerics import device_table

# torch >= 2.13 names it all_gather_single_autograd and deprecates the older name, which
# is the only one torch 2.11 has; both gather along dim 0 and reduce-scatter (sum) in backward.
_all_gather_with_grad = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
MODES = ("all_gather", "ring")
# Message tags: candidate blocks and gradient accumulators travel between the same neighbours.
_BLOCK_TAG, _GRADIENT_TAG = 17, 18


def world_size_and_rank(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group`` (default: the world), ``(1, 0)`` when not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_layers(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather ``[L, R, D]`` with gradient into ``[W, L, R, D]`` (rank-major)."""
    world_size = dist.get_world_size(group)
    # The functional gather returns an AsyncCollectiveTensor that waits on its first non-view use; a
    # pure view of it (the permute/reshape below, when they copy nothing) would reach a backend's
    # kernel still unfilled. wait_tensor hands back the materialised tensor, its backward the identity.
    gathered = funcol.wait_tensor(_all_gather_with_grad(x.contiguous(), 0, group))
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
    """``backend.pair_losses`` (the Triton backend's fused default path) of the local queries against the
    candidates of all ranks; every other loss all-gathers through :mod:`m2d_kernels.objective`.

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


def ring_losses(
    backend: ModuleType,
    queries: torch.Tensor,
    docs: torch.Tensor,
    dims: tuple[int, ...],
    active: tuple[tuple[bool, ...], ...],
    scale: float,
    positive_index: torch.Tensor,
    symmetric: bool,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The default loss's ``[L, M]`` losses of the local queries against the candidates of all ranks (W > 1),
    by a ring exchange of the backend's passes: the losses and gradients of the all-gather, with per-rank
    memory independent of ``W`` (two blocks in flight, their gradient accumulators in backward).
    ``queries`` and ``docs`` must have the same shapes on every rank."""
    group = group if group is not None else dist.group.WORLD
    losses = _RingInfoNCE.apply(queries, docs, positive_index, backend, dims, active, scale, group)
    if not symmetric:
        return losses
    # doc_to_query: a second ring, the local positives as rows, the query blocks circulating.
    own_queries = torch.arange(queries.shape[1], device=queries.device)
    reverse = _RingInfoNCE.apply(docs[:, positive_index], queries, own_queries, backend, dims, active, scale, group)
    return (losses + reverse) / 2


class _Ring:
    """Neighbours in ``group``: blocks go to rank ``r + 1`` and come from rank ``r - 1``."""

    def __init__(self, group: dist.ProcessGroup):
        self.size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.send_to = dist.get_global_rank(group, (rank + 1) % self.size)
        self.receive_from = dist.get_global_rank(group, (rank - 1) % self.size)
        self.group = group

    def exchange(self, outgoing: torch.Tensor, incoming: torch.Tensor, tag: int) -> list:
        # One batch: NCCL needs a rank's send and receive grouped (with W = 2 both go to the same peer).
        return dist.batch_isend_irecv([
            dist.P2POp(dist.isend, outgoing, self.send_to, self.group, tag),
            dist.P2POp(dist.irecv, incoming, self.receive_from, self.group, tag),
        ])

    def blocks(self, own: torch.Tensor) -> Iterator[torch.Tensor]:
        """The blocks of ranks ``r, r - 1, ..., r - W + 1``; the next one arrives while the caller
        works on the current one. Two buffers besides ``own``: one being scored, one being received."""
        current, spare = own, None
        for step in range(self.size):
            last = step == self.size - 1
            if not last:
                incoming = torch.empty_like(own) if spare is None else spare
                requests = self.exchange(current, incoming, _BLOCK_TAG)
            yield current
            if not last:
                for request in requests:
                    request.wait()
                # `current` has been sent: its buffer receives the block after next (never the caller's own).
                spare = current if current is not own else None
                current = incoming


class _RingInfoNCE(torch.autograd.Function):
    """Losses ``[L, M]`` of local ``rows`` against the column blocks of all ranks (mean over rows);
    backward returns every block's gradient, summed over all ranks' losses, to its owner."""

    @staticmethod
    def forward(ctx, rows, cols, positives, backend, dims, active, scale, group):
        rows, cols = rows.detach().contiguous(), cols.detach().contiguous()
        absent = torch.full_like(positives, -1)
        softmax = positive = None
        for step, block in enumerate(_Ring(group).blocks(cols)):
            stats = backend.row_statistics(rows, block, dims, active, scale, positives if step == 0 else absent)
            if step == 0:
                softmax, positive = stats.rows, stats.positive_logit
            else:
                softmax = combine(softmax, stats.rows)
        active_pairs = device_table(active, rows.device)
        losses = torch.where(active_pairs, ((softmax.offset - positive) + softmax.log_sum).mean(1), 0.0)
        ctx.save_for_backward(rows, cols, positives, softmax.offset, softmax.log_sum)
        ctx.config = (backend, dims, active, scale, group)
        return losses.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_losses):
        rows, cols, positives, offset, log_sum = ctx.saved_tensors
        backend, dims, active, scale, group = ctx.config
        ring = _Ring(group)
        coef = grad_losses.to(offset.dtype) / rows.shape[1]  # per row: each loss is a mean over the rows
        # Gradients accumulate in fp32 at least (not once rounded to bf16 per block).
        accumulate = torch.promote_types(cols.dtype, torch.float32)
        absent = torch.full_like(positives, -1)
        grad_rows, incoming, outgoing, requests = None, None, None, []
        for step, block in enumerate(ring.blocks(cols)):
            grad = backend.pass_gradients(rows, block, dims, active, scale, positives if step == 0 else absent,
                                          Softmax(offset, log_sum), coef)
            d_block = grad.cols
            grad_rows = grad.rows.to(accumulate) if grad_rows is None else grad_rows.add_(grad.rows)
            for request in requests:  # this block's accumulator, sent by the previous rank during our compute
                request.wait()
            outgoing = d_block.to(accumulate)
            if incoming is not None:
                outgoing.add_(incoming)
            # Forward the accumulator; after the last step what arrives is our own block's, complete.
            incoming = torch.empty_like(outgoing)
            requests = ring.exchange(outgoing, incoming, _GRADIENT_TAG)
        for request in requests:
            request.wait()
        del outgoing  # sent
        return grad_rows.to(rows.dtype), incoming.to(cols.dtype), None, None, None, None, None, None
