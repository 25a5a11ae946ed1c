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
