"""Matryoshka2dEvaluator against a naive per-pair computation written here: each layer's embeddings from a copy of
the model cut to that many layers and sentence-transformers' own encode(), then per (layer, dim) a plain-Python
Spearman (scipy) or a plain-Python ranking per query."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

st = pytest.importorskip("sentence_transformers")
from st_helpers import WORDS, sentences, tiny_model, write_tiny_bert  # noqa: E402

from m2d_kernels.integrations.evaluator import Matryoshka2dEvaluator, pair_key  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")
LAYERS, DIMS = (1, 2, 3), (4, 20, 40)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Transformer (3 layers, 48 wide) + mean pooling + Dense 48 -> 40 + Normalize, untrained."""
    return tiny_model(write_tiny_bert(tmp_path_factory.mktemp("bert")), head=True)


def naive_layer_embeddings(model, texts, layer):
    """sentence-transformers' encode() on a copy of the model whose transformer keeps its first ``layer`` layers."""
    cut = copy.deepcopy(model)
    encoder = cut[0].auto_model.encoder
    encoder.layer = encoder.layer[:layer]
    cut[0].auto_model.config.num_hidden_layers = layer
    return cut.encode(texts, convert_to_tensor=True, batch_size=4).double()


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def naive_retrieval(query_vectors, corpus_vectors, relevant_sets, k_ndcg=10, k_mrr=10, recall_at=(1, 10)):
    totals = {"ndcg@10": 0.0, "mrr@10": 0.0} | {f"recall@{k}": 0.0 for k in recall_at}
    for q, relevant in zip(query_vectors, relevant_sets):
        scored = [(cosine(q, c), doc in relevant, doc) for doc, c in enumerate(corpus_vectors)]
        # Best first; among equal scores the irrelevant documents first (ties count against the query).
        ranking = [rel for _, rel, _ in sorted(scored, key=lambda t: (-t[0], t[1]))]
        dcg = sum(1 / math.log2(i + 2) for i, rel in enumerate(ranking[:k_ndcg]) if rel)
        idcg = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k_ndcg)))
        totals["ndcg@10"] += dcg / idcg
        first = ranking.index(True)
        totals["mrr@10"] += 1 / (first + 1) if first < k_mrr else 0.0
        for k in recall_at:
            totals[f"recall@{k}"] += sum(ranking[:k]) / len(relevant)
    return {name: value / len(query_vectors) for name, value in totals.items()}


def test_sts_grid_matches_the_naive_computation(model, tmp_path):
    first, second = sentences(24, seed=1), sentences(24, seed=2)
    gold = [random.Random(i).random() * 5 for i in range(24)]
    evaluator = Matryoshka2dEvaluator(layers=LAYERS, dims=DIMS, sentences1=first, sentences2=second, scores=gold,
                                      batch_size=5, name="toy")
    metrics = evaluator(model, output_path=str(tmp_path))
    evaluator(model, output_path=str(tmp_path), epoch=1, steps=5)
    rows = (tmp_path / "toy_matryoshka_2d_results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,steps,layer1_dim4_spearman") and rows[2].startswith("1,5,")
    assert json.loads((tmp_path / "toy_matryoshka_2d_grid.json").read_text())["steps"] == 5
    assert evaluator.primary_metric == "toy_mean_spearman"
    expected_grid = []
    for layer in LAYERS:
        a, b = naive_layer_embeddings(model, first, layer), naive_layer_embeddings(model, second, layer)
        row = []
        for dim in DIMS:
            cosines = [cosine(x[:dim].tolist(), y[:dim].tolist()) for x, y in zip(a, b)]
            row.append(scipy_stats.spearmanr(cosines, gold).statistic)
            assert metrics[f"toy_{pair_key(layer, dim, 'spearman')}"] == pytest.approx(row[-1], abs=1e-5)
        expected_grid.append(row)
    assert metrics["toy_mean_spearman"] == pytest.approx(sum(map(sum, expected_grid)) / 9, abs=1e-5)
    assert metrics["toy_full_spearman"] == pytest.approx(expected_grid[-1][-1], abs=1e-5)


def test_retrieval_grid_matches_the_naive_computation(model):
    rng = random.Random(3)
    corpus = {f"d{i}": text for i, text in enumerate(sentences(30, seed=4))}
    corpus["dup"] = corpus["d0"]  # an exact tie with d0 at every (layer, dim)
    queries = {f"q{i}": text for i, text in enumerate(sentences(12, seed=5))}
    relevant = {qid: set(rng.sample(sorted(corpus), rng.randint(1, 3))) for qid in queries}
    relevant["q0"] = {"dup"}  # ranks behind its tied twin d0
    queries["unjudged"] = "the cat"  # no relevant document: skipped, as InformationRetrievalEvaluator does
    evaluator = Matryoshka2dEvaluator(layers=LAYERS, dims=DIMS, queries=queries, corpus=corpus,
                                      relevant_docs=relevant, recall_at=(1, 10), primary="smallest_within:2")
    metrics = evaluator(model)
    assert evaluator.primary_metric == "smallest_within_ndcg@10"
    ids = sorted(relevant)
    corpus_ids = list(corpus)
    grid = {}
    for layer in LAYERS:
        q = naive_layer_embeddings(model, [queries[i] for i in ids], layer)
        c = naive_layer_embeddings(model, [corpus[i] for i in corpus_ids], layer)
        for dim in DIMS:
            expected = naive_retrieval([v[:dim].tolist() for v in q], [v[:dim].tolist() for v in c],
                                       [{corpus_ids.index(d) for d in relevant[i]} for i in ids])
            for name, value in expected.items():
                assert metrics[pair_key(layer, dim, name)] == pytest.approx(value, abs=1e-9), (layer, dim, name)
            grid[layer, dim] = expected["ndcg@10"]
    full = grid[3, 40]
    smallest = next((layer, dim) for layer in LAYERS for dim in DIMS if grid[layer, dim] >= full - 0.02)
    assert (metrics["smallest_within_layer"], metrics["smallest_within_dim"]) == smallest
    assert metrics["smallest_within_ndcg@10"] == pytest.approx(grid[smallest])


def test_errors_name_the_argument(model):
    sts = dict(sentences1=["a", "b"], sentences2=["c", "d"], scores=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"layers \[4\]: unknown layer\(s\), this model has layers 1\.\.3"):
        Matryoshka2dEvaluator(layers=(1, 4), dims=(8,), **sts)(model)
    with pytest.raises(ValueError, match="dim 48 is larger than the model's hidden size 40"):
        Matryoshka2dEvaluator(layers=(1,), dims=(8, 48), **sts)(model)
    with pytest.raises(ValueError, match=r"primary pair \(2, 16\) is not in the grid"):
        Matryoshka2dEvaluator(layers=(1, 2), dims=(8, 40), primary=(2, 16), **sts)(model)
    with pytest.raises(ValueError, match="primary must be"):
        Matryoshka2dEvaluator(primary="best", **sts)
    with pytest.raises(ValueError, match="come together"):
        Matryoshka2dEvaluator(sentences1=["a"], scores=[1.0])
    with pytest.raises(ValueError, match="not in the corpus"):
        Matryoshka2dEvaluator(queries={"q": "a"}, corpus={"d": "b"}, relevant_docs={"q": {"x"}})


def test_trainer_logs_every_pair_and_selects_by_the_primary_metric(model, tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from m2d_kernels.integrations.sentence_transformers import FusedMatryoshka2dLoss

    trained = copy.deepcopy(model)
    rng = random.Random(0)
    anchors = sentences(16, seed=7)
    train = datasets.Dataset.from_dict({"anchor": anchors,
                                        "positive": [a + " " + rng.choice(WORDS) for a in anchors]})
    evaluator = Matryoshka2dEvaluator(layers=(1, 3), dims=(8, 40), sentences1=sentences(10, seed=8),
                                      sentences2=sentences(10, seed=9), scores=[float(i % 5) for i in range(10)],
                                      primary=(1, 8), name="sts")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, eval_strategy="steps",
        eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="sts_layer1_dim8_spearman", report_to=[], use_cpu=True)
    loss = FusedMatryoshka2dLoss(trained, MultipleNegativesRankingLoss(trained), [40, 8])
    trainer = SentenceTransformerTrainer(model=trained, args=args, train_dataset=train, loss=loss,
                                         evaluator=evaluator)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_sts_layer1_dim8_spearman" in entry]
    assert len(logged) == 2
    assert {f"eval_sts_{pair_key(layer, d, 'spearman')}" for layer in (1, 3) for d in (8, 40)} <= set(logged[0])
    best = max(entry["eval_sts_layer1_dim8_spearman"] for entry in logged)
    assert trainer.state.best_metric == pytest.approx(best)
