"""The 2D evaluator against hand computations and scipy.stats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m2d_kernels.train import evaluate
from m2d_kernels.train.data import ScoredPairs

scipy_stats = pytest.importorskip("scipy.stats")


def test_average_ranks_by_hand():
    ranks = evaluate.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.5]))
    assert ranks.tolist() == [5.0, 2.0, 5.0, 3.0, 5.0, 1.0]


def test_spearman_by_hand_and_against_scipy():
    # x ranks 1..5, y ranks (2, 1, 4, 3, 5): d^2 sum = 4, rho = 1 - 6*4/(5*24) = 0.8
    rho = evaluate.spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([20.0, 10, 40, 30, 50]))
    assert rho == pytest.approx(0.8)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=generator).double()  # many ties
    y = x + torch.randn(200, generator=generator, dtype=torch.float64) * 2
    assert evaluate.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="spearman"):
        evaluate.spearman(torch.ones(3), torch.ones(4))


def test_retrieval_metrics_by_hand():
    # Cosines of query i (axis i) with each document: query 0 -> (1, .19, 0): its own first;
    # query 1 -> (0, .28, .45): its own second; query 2 -> (0, .94, .89): its own second.
    queries = torch.eye(3)
    corpus = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 1.0], [0.0, 0.5, 1.0]])
    mrr, recall = evaluate.retrieval_metrics(queries, corpus)
    assert mrr == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert recall == pytest.approx(1 / 3)


def test_mrr_stops_at_ten():
    queries = torch.zeros(12, 12)
    queries[:, 0] = 1.0
    corpus = torch.eye(12)  # only document 0 matches any query: query i > 0 has its positive tied with 11 others
    mrr, recall = evaluate.retrieval_metrics(queries, corpus)
    assert mrr == pytest.approx(1 / 12) and recall == pytest.approx(1 / 12)


class FixedEncoder:
    """Returns stored embeddings per sentence; stands in for a model."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def encode(self, texts, layers, batch_size=64):
        return torch.stack([self.table[t] for t in texts], dim=1)[list(layers)]


def test_sts_grid_matches_scipy_on_truncated_cosines():
    generator = torch.Generator().manual_seed(1)
    n, layers, dims = 30, [0, 2], [3, 7, 10]
    first = [f"a{i}" for i in range(n)]
    second = [f"b{i}" for i in range(n)]
    table = {s: torch.randn(3, 10, generator=generator) for s in first + second}
    gold = torch.rand(n, generator=generator).tolist()
    result = evaluate.sts_grid(FixedEncoder(table), ScoredPairs("toy", first, second, gold), layers, dims)
    for i, layer in enumerate(layers):
        for j, d in enumerate(dims):
            a = np.stack([table[s][layer, :d].numpy() for s in first])
            b = np.stack([table[s][layer, :d].numpy() for s in second])
            cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            expected = 100 * scipy_stats.spearmanr(cosine, gold).statistic
            assert result["metrics"]["spearman"][i][j] == pytest.approx(expected, abs=1e-6)


def test_retrieval_grid_uses_truncation():
    # In the first 2 dims every document looks alike; the third dim identifies it.
    pairs = [("q0", "d0"), ("q1", "d1"), ("q2", "d2")]
    table = {f"q{i}": torch.tensor([[1.0, 1.0, float(i) - 1.0]]) for i in range(3)}
    table |= {f"d{i}": torch.tensor([[1.0, 1.0, float(i) - 1.0]]) for i in range(3)}
    result = evaluate.retrieval_grid(FixedEncoder(table), pairs, [0], [2, 3])
    # dim 2: all scores tie and ties count against the query, so every positive ranks 3rd
    # (MRR 1/3, R@1 0); dim 3: each query's own document is the only one at cosine 1.
    assert result["metrics"]["mrr@10"][0] == pytest.approx([100 / 3, 100.0])
    assert result["metrics"]["recall@1"][0] == pytest.approx([0.0, 100.0])


def test_tables_json_and_heatmap(tmp_path):
    before = {"set": "toy", "metrics": {"spearman": [[10.0, 20.0], [30.0, 40.0]]}, "layers": [1, 2], "dims": [8, 16]}
    after = {**before, "metrics": {"spearman": [[15.0, 20.0], [29.0, 50.0]]}}
    assert evaluate.difference(before, after)["metrics"]["spearman"] == [[5.0, 0.0], [-1.0, 10.0]]
    table = evaluate.format_comparison(before, after)
    assert "toy spearman (after - before)" in table and "-1.0" in table and "50.0" in table
    evaluate.write_json_atomic(tmp_path / "out" / "grid.json", after)
    assert json.loads((tmp_path / "out" / "grid.json").read_text()) == after
    evaluate.save_heatmap(tmp_path / "out" / "grid.png", before, after)
    assert (tmp_path / "out" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.json", "grid.png"]  # no temporaries left
    with pytest.raises(ValueError, match="same layers and dims"):
        evaluate.difference(before, {**after, "dims": [8, 32]})
