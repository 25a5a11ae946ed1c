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
) -> torch.Tensor:
    """Per-pair InfoNCE losses ``[L, M]`` (0 where a pair is inactive), in the input dtype."""
    n_queries = queries.shape[1]
    query_labels = torch.arange(n_queries, device=queries.device)
    zero = queries.new_zeros(())
    losses = []
    for layer, layer_active in enumerate(active):
        for dim_index, dim in enumerate(dims):
            if not layer_active[dim_index]:
                losses.append(zero)
                continue
            q = F.normalize(queries[layer, :, :dim], p=2, dim=-1)
            k = F.normalize(docs[layer, :, :dim], p=2, dim=-1)
            # query_to_doc: each query against every candidate.
            q2d = q @ k.T * scale
            loss = F.cross_entropy(q2d, positive_index)
            if symmetric:
                # doc_to_query, partition_mode="per_direction": each positive against every query.
                d2q = k[positive_index] @ q.T * scale
                loss = (loss + F.cross_entropy(d2q, query_labels)) / 2
            losses.append(loss)
    return torch.stack(losses).view(len(active), len(dims))
