"""The 2D evaluator: a layer x dim grid of STS Spearman or retrieval quality.

Every cell embeds with one hidden layer (pooled) truncated to its leading ``dim``
features, then compares by cosine similarity:

- STS: Spearman rank correlation (x 100) between cosine and gold scores.
- Retrieval: each anchor of a held-out pair queries all positives; MRR@10, Recall@1,
  nDCG@10 and Recall@10 (x 100) of its own positive (the first two are printed).

The scoring functions (:func:`sts_spearman_grid`, :func:`retrieval_grid_scores`) are shared with the
sentence-transformers evaluator :class:`m2d_kernels.integrations.evaluator.Matryoshka2dEvaluator`.

One forward per batch yields all layers (``output_hidden_states``); truncation and
re-normalisation are free after that.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from m2d_kernels.train.atomic import atomic_write
from m2d_kernels.train.data import Example, ScoredPairs
from m2d_kernels.train.encoder import LayerEncoder

MRR_CUTOFF = 10


# --------------------------------------------------------------------------- metrics


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor; ties share the mean of the ranks they span."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    # Start of each run of equal values, and for every position the run it belongs to.
    is_new = torch.ones_like(sorted_values, dtype=torch.bool)
    is_new[1:] = sorted_values[1:] != sorted_values[:-1]
    run_id = torch.cumsum(is_new.long(), 0) - 1
    starts = torch.nonzero(is_new).flatten()
    ends = torch.cat([starts[1:], torch.tensor([len(values)])])
    mean_rank = (starts + ends + 1).double() / 2  # mean of 1-based ranks start+1 .. end
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks."""
    if x.shape != y.shape or x.dim() != 1 or len(x) < 2:
        raise ValueError(f"spearman needs two 1-D tensors of one length >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def ranked_relevance(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """``[n_queries, n_docs]`` scores and a boolean relevance mask of the same shape -> the mask in each query's
    ranked order (best first). Ties count against the query: among equal scores the irrelevant documents
    rank first, so a model that cannot tell documents apart gets no credit."""
    # Stable sorts: irrelevant before relevant, then by score (descending), keeping that order among ties.
    by_relevance = torch.argsort(relevant.to(torch.int8), dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_relevance), dim=1, descending=True, stable=True)
    return relevant.gather(1, by_relevance.gather(1, by_score))


def retrieval_scores(scores: torch.Tensor, relevant: torch.Tensor, ndcg_at: int = 10, mrr_at: int = MRR_CUTOFF,
                     recall_at: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Binary-relevance retrieval metrics (fractions, not x 100), averaged over the queries:
    ``ndcg@k`` (gain 1 / log2(rank + 1), normalised by the ideal ranking), ``mrr@k`` (1 / rank of the first
    relevant document within k, else 0) and ``recall@k`` (share of the relevant documents in the top k).

    ``scores`` and ``relevant``: ``[n_queries, n_docs]``; every query needs a relevant document.
    """
    if scores.shape != relevant.shape or scores.dim() != 2:
        raise ValueError(f"scores and relevant must be [n_queries, n_docs] alike, got {tuple(scores.shape)} and "
                         f"{tuple(relevant.shape)}")
    counts = relevant.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("every query needs at least one relevant document")
    ranked = ranked_relevance(scores, relevant.bool()).double()
    positions = torch.arange(1, ranked.shape[1] + 1, dtype=torch.float64)
    discount = 1.0 / torch.log2(positions + 1)
    dcg = (ranked[:, :ndcg_at] * discount[:ndcg_at]).sum(1)
    ideal = torch.stack([discount[:min(int(c), ndcg_at)].sum() for c in counts])
    first = torch.argmax(ranked, dim=1)  # the first relevant position (there is one)
    reciprocal = torch.where(first < mrr_at, 1.0 / (first + 1).double(), torch.zeros((), dtype=torch.float64))
    metrics = {f"ndcg@{ndcg_at}": float((dcg / ideal).mean()), f"mrr@{mrr_at}": float(reciprocal.mean())}
    for k in recall_at:
        metrics[f"recall@{k}"] = float((ranked[:, :k].sum(1) / counts.double()).mean())
    return metrics


def cosine_scores(queries: torch.Tensor, corpus: torch.Tensor) -> torch.Tensor:
    """``[n_queries, n_docs]`` cosine similarities, in float64."""
    return torch.nn.functional.normalize(queries.double(), dim=-1) @ torch.nn.functional.normalize(
        corpus.double(), dim=-1).T


def retrieval_metrics(queries: torch.Tensor, corpus: torch.Tensor) -> tuple[float, float]:
    """(MRR@10, Recall@1) where query ``i``'s only relevant document is ``corpus[i]``.

    Ties count against the query (a competitor scoring equal to the positive ranks ahead).
    """
    scores = cosine_scores(queries, corpus)
    metrics = retrieval_scores(scores, torch.eye(*scores.shape, dtype=torch.bool), recall_at=(1,))
    return metrics[f"mrr@{MRR_CUTOFF}"], metrics["recall@1"]


def sts_spearman_grid(first: torch.Tensor, second: torch.Tensor, gold: torch.Tensor,
                      dims: Sequence[int]) -> list[list[float]]:
    """Spearman (fraction) of the truncated cosine against ``gold``: ``first`` / ``second`` ``[L, n, D]`` ->
    ``[L][len(dims)]``."""
    return [[spearman(_truncated_cosine(first[i], second[i], d), gold) for d in dims] for i in range(len(first))]


def retrieval_grid_scores(queries: torch.Tensor, corpus: torch.Tensor, relevant: torch.Tensor,
                          dims: Sequence[int], **cutoffs) -> dict[str, list[list[float]]]:
    """:func:`retrieval_scores` (fractions) of every (layer, dim): ``queries`` ``[L, n_queries, D]``, ``corpus``
    ``[L, n_docs, D]``, ``relevant`` ``[n_queries, n_docs]`` -> ``{metric: [L][len(dims)]}``."""
    grids: dict[str, list[list[float]]] = {}
    for i in range(len(queries)):
        cells = [retrieval_scores(cosine_scores(queries[i, :, :d], corpus[i, :, :d]), relevant, **cutoffs)
                 for d in dims]
        for name in cells[0]:
            grids.setdefault(name, []).append([cell[name] for cell in cells])
    return grids


# --------------------------------------------------------------------------- grids


def _truncated_cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a, b = a[..., :dim].double(), b[..., :dim].double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def sts_grid(encoder: LayerEncoder, data: ScoredPairs, layers: Sequence[int], dims: Sequence[int],
             batch_size: int = 64) -> dict:
    """``{"metric": "spearman", "grid": [[...]]}`` with Spearman x 100 per (layer, dim)."""
    first = encoder.encode(data.sentences1, layers, batch_size)
    second = encoder.encode(data.sentences2, layers, batch_size)
    gold = torch.tensor(data.scores, dtype=torch.float64)
    grid = [[100 * value for value in row] for row in sts_spearman_grid(first, second, gold, dims)]
    return {"set": data.name, "metrics": {"spearman": grid}, "layers": list(layers), "dims": list(dims),
            "size": len(gold)}


def retrieval_grid(encoder: LayerEncoder, pairs: Sequence[Example], layers: Sequence[int], dims: Sequence[int],
                   batch_size: int = 64, name: str = "retrieval") -> dict:
    """``{"metrics": {"mrr@10": grid, "recall@1": grid, "ndcg@10": grid, "recall@10": grid}}`` x 100 per
    (layer, dim): each anchor queries all positives, its own is the one relevant document
    (:func:`retrieval_grid_scores`, the scoring of the sentence-transformers evaluator too)."""
    queries = encoder.encode([p[0] for p in pairs], layers, batch_size)
    corpus = encoder.encode([p[1] for p in pairs], layers, batch_size)
    grids = retrieval_grid_scores(queries, corpus, torch.eye(len(pairs), dtype=torch.bool), dims)
    order = (f"mrr@{MRR_CUTOFF}", "recall@1", "ndcg@10", "recall@10")
    metrics = {metric: [[100 * value for value in row] for row in grids[metric]] for metric in order}
    return {"set": name, "metrics": metrics, "layers": list(layers), "dims": list(dims), "size": len(pairs),
            "printed": list(order[:2])}


# --------------------------------------------------------------------------- reporting


def format_grid(grid: Sequence[Sequence[float]], layers: Sequence[int], dims: Sequence[int], title: str = "") -> str:
    """A plain-text table: one row per layer, one column per dim."""
    width = max(7, max(len(str(d)) for d in dims) + 1)
    lines = [title] if title else []
    lines.append("layer\\dim" + "".join(f"{d:>{width}}" for d in dims))
    for layer, row in zip(layers, grid, strict=True):
        lines.append(f"{layer:>9}" + "".join(f"{v:>{width}.1f}" for v in row))
    return "\n".join(lines)


def difference(before: dict, after: dict) -> dict:
    """after - before, cell by cell, for every metric the two results share."""
    if before["layers"] != after["layers"] or before["dims"] != after["dims"]:
        raise ValueError("before and after must be evaluated on the same layers and dims")
    metrics = {}
    for name, grid in before["metrics"].items():
        if name in after["metrics"]:
            rows = zip(after["metrics"][name], grid, strict=True)
            metrics[name] = [[a - b for a, b in zip(row_a, row_b, strict=True)] for row_a, row_b in rows]
    return {**after, "metrics": metrics}


def format_comparison(before: dict, after: dict, metrics: Sequence[str] | None = None) -> str:
    """Before, after and after - before tables for every metric of ``metrics`` (default: the result's
    ``printed`` metrics when it names some, else all)."""
    delta = difference(before, after)
    blocks = []
    for name in metrics or before.get("printed") or before["metrics"]:
        for label, result in (("before", before), ("after", after), ("after - before", delta)):
            blocks.append(format_grid(result["metrics"][name], result["layers"], result["dims"],
                                      f"{result['set']} {name} ({label})"))
    return "\n\n".join(blocks)


def write_json_atomic(path: str | os.PathLike, payload: object) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    atomic_write(path, lambda file: file.write(json.dumps(payload, indent=2).encode("utf-8")))


def save_heatmap(path: str | os.PathLike, before: dict, after: dict | None = None, metric: str | None = None,
                 title: str | None = None) -> None:
    """A PNG heat map of one metric: the grid alone, or before / after / after - before.

    ``title`` (e.g. the model and the training data) heads the figure and is stored as the
    PNG's ``Title`` text field."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metric = metric or next(iter(before["metrics"]))
    panels = [("before" if after else "", before["metrics"][metric], "viridis")]
    if after is not None:
        panels += [("after", after["metrics"][metric], "viridis"),
                   ("after - before", difference(before, after)["metrics"][metric], "RdBu")]
    low = min(min(min(row) for row in grid) for _, grid, _ in panels[:2])
    high = max(max(max(row) for row in grid) for _, grid, _ in panels[:2])
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 0.5 * len(before["layers"]) + 1.6),
                                squeeze=False)
    for axis, (label, grid, colours) in zip(axes[0], panels, strict=False):
        tensor = torch.tensor(grid).numpy()
        if colours == "RdBu":
            bound = max(float(abs(tensor).max()), 1e-9)
            image = axis.imshow(tensor, cmap=colours, vmin=-bound, vmax=bound, aspect="auto")
        else:
            image = axis.imshow(tensor, cmap=colours, vmin=low, vmax=high, aspect="auto")
        for row in range(tensor.shape[0]):
            for column in range(tensor.shape[1]):
                # White on the dark half of each colour map, black on the light half.
                shade = image.norm(tensor[row, column])
                dark = shade < 0.45 if colours == "viridis" else abs(shade - 0.5) > 0.3
                axis.text(column, row, f"{tensor[row, column]:.1f}", ha="center", va="center", fontsize=7,
                          color="white" if dark else "black")
        axis.set_xticks(range(len(before["dims"])), before["dims"])
        axis.set_yticks(range(len(before["layers"])), before["layers"])
        axis.set_xlabel("dim")
        axis.set_ylabel("layer")
        axis.set_title(f"{before['set']} {metric} {label}".strip(), fontsize=9)
        figure.colorbar(image, ax=axis, shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    metadata = {"Title": title} if title else None
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110, metadata=metadata))
    plt.close(figure)
