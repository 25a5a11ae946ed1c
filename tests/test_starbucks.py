"""Starbucks: FusedStarbucksLoss against a naive transcription of the original StarbucksLoss, and the
retrieval objective's score distillation against a naive per-pair F.kl_div, all in float64.

The oracle follows ielab/Starbucks ``sts/starbucks_loss.py`` statement by statement, but gets layer
``k``'s sentence embeddings another way: the BERT encoder cut to its first ``k`` layers, then the
model's own modules (eval mode, so no dropout draws differ), and the base loss per pair on the
truncated, normalised embeddings, as the original's modified MatryoshkaLoss feeds it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")

from sentence_transformers.sentence_transformer import losses  # noqa: E402
from sentence_transformers.util import dot_score  # noqa: E402
from st_helpers import sentences, st_step, tiny_model, write_tiny_bert  # noqa: E402

import m2d_kernels as m2d  # noqa: E402
from m2d_kernels.integrations.starbucks import FusedStarbucksLoss  # noqa: E402

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture
EXAMPLES = Path(__file__).resolve().parents[1] / "python"

BATCH = 5
LAYERS = 4  # BERT layers; the head maps 48 -> 40
TOL = 1e-9


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("starbucks_bert"), layers=LAYERS)


@pytest.fixture(scope="module")
def model(bert_dir):
    """Pooling, Dense 48 -> 40 and Normalize: the head the loss re-runs on every layer."""
    return tiny_model(bert_dir, head=True).double().eval()


@pytest.fixture(scope="module", params=[True, False], ids=["dense_head", "pooling_only"])
def any_model(request, bert_dir):
    return tiny_model(bert_dir, head=request.param).double().eval()


def _features(model, n_columns, seed=0):
    return [model.preprocess(sentences(BATCH, seed + column)) for column in range(n_columns)]


def _layer_embeddings(model, features, k):
    """Hidden state ``k`` through the model's head: run the encoder with only its first ``k`` layers."""
    encoder = model[0].auto_model.encoder
    all_layers = encoder.layer
    encoder.layer = all_layers[:k]
    try:
        return model(dict(features))["sentence_embedding"]
    finally:
        encoder.layer = all_layers


def naive_starbucks(model, base, features, labels, matryoshka_layers, matryoshka_dims, n_selections_per_step=-1,
                    last_layer_weight=1.0, kl_div_weight=1.0, kl_temperature=0.3):
    num_layers = model[0].auto_model.config.num_hidden_layers

    def base_loss(embeddings, dim):
        return base.compute_loss_from_embeddings([F.normalize(e[:, :dim], p=2, dim=-1) for e in embeddings], labels)

    final = [_layer_embeddings(model, f, num_layers) for f in features]
    loss = base_loss(final, final[0].shape[-1]) * last_layer_weight
    final_embeddings = torch.cat(final, dim=0)
    layer_indices = [i for i in [layer - 1 for layer in matryoshka_layers] if i < num_layers - 1]
    dim_indices = [matryoshka_dims[i] for i in range(len(layer_indices))]
    if n_selections_per_step > 0 and n_selections_per_step < num_layers - 1:
        layer_indices = random.sample(layer_indices, n_selections_per_step)
        dim_indices = [matryoshka_dims[layer_indices.index(i)] for i in layer_indices]
    for layer_idx, dim in zip(layer_indices, dim_indices):
        layer = [_layer_embeddings(model, f, layer_idx + 1) for f in features]
        loss = loss + base_loss(layer, dim)
        if kl_temperature > 0:
            p, q = torch.cat(layer, dim=0)[:, :dim], final_embeddings.clone()[:, :dim]
            kl = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="batchmean")
            loss = loss + kl * kl_temperature * kl_div_weight
    return loss





def _assert_same(expected, actual):
    (loss_e, grads_e, rng_e), (loss_a, grads_a, rng_a) = expected, actual
    torch.testing.assert_close(loss_a, loss_e, rtol=TOL, atol=0)
    assert grads_a.keys() == grads_e.keys()
    scale = max(g.abs().max() for g in grads_e.values())
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=TOL, atol=TOL * scale, msg=name)
    assert rng_a == rng_e, "Python's random was consumed differently"


def _mnrl(model, **kwargs):
    return losses.MultipleNegativesRankingLoss(model, **kwargs)


def _width(model):
    return model.get_embedding_dimension()


ALL_DIRECTIONS = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                      hardness_mode="in_batch_negatives", hardness_strength=0.5)


@pytest.mark.parametrize(("n_columns", "mnrl", "last_layer_weight", "kl_temperature", "backend"), [
    (2, {}, 1.0, 0.3, "reference"),
    (3, dict(similarity_fct=dot_score), 2.5, 0.7, "torch"),
    (2, dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"), -0.5, 0.3, "torch"),
    (3, dict(similarity_fct=dot_score, **ALL_DIRECTIONS), 1.0, 0.0, "reference"),
], ids=["mnrl", "dot_score", "symmetric", "all_directions_hardness"])
def test_fused_matches_the_original(any_model, n_columns, mnrl, last_layer_weight, kl_temperature, backend):
    model = any_model
    base = losses.MultipleNegativesRankingLoss(model, scale=7.0, **mnrl)
    layers, dims = [1, 2, 3, 4], [8, 24, 17, _width(model)]  # 4 is the final layer: dropped from the pairs
    args = dict(last_layer_weight=last_layer_weight, kl_div_weight=1.5, kl_temperature=kl_temperature)
    features = _features(model, n_columns)
    fused = FusedStarbucksLoss(model, base, layers, dims, backend=backend, **args)
    expected = st_step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims, **args), features)
    _assert_same(expected, st_step(model, fused, features))


@pytest.mark.parametrize(("n_selections_per_step", "seed"), [(1, 0), (2, 1), (2, 2), (3, 0)])
def test_sampled_selections_match_the_original(model, n_selections_per_step, seed):
    # Layers out of order and a repeated dim; the k-th drawn layer gets dims[k], as the original.
    base = _mnrl(model, scale=11.0)
    layers, dims = [3, 1, 2], [16, 8, 16]
    features = _features(model, 2, seed=seed)
    fused = FusedStarbucksLoss(model, base, layers, dims, n_selections_per_step=n_selections_per_step,
                               backend="torch")
    expected = st_step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims, n_selections_per_step),
                     features, seed=seed)
    _assert_same(expected, st_step(model, fused, features, seed=seed))


def test_unfused_base_loss_is_computed_per_pair(model):
    base = losses.CoSENTLoss(model)
    layers, dims = [2, 1, 4], [24, 8, 40]
    features = _features(model, 2)
    labels = torch.rand(BATCH, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fused = FusedStarbucksLoss(model, base, layers, dims, kl_div_weight=0.5)
    expected = st_step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims, kl_div_weight=0.5),
                     features, labels)
    with pytest.warns(UserWarning, match="CoSENTLoss is not fused"):
        actual = st_step(model, fused, features, labels)
    _assert_same(expected, actual)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        st_step(model, fused, features, labels)


def test_gradient_cache_matches_the_original(model):
    base = _mnrl(model, scale=9.0)
    layers, dims = [1, 3], [8, 32]
    features = _features(model, 3)
    fused = FusedStarbucksLoss(model, base, layers, dims, mini_batch_size=2, backend="torch")
    expected = st_step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims), features)
    _assert_same(expected, st_step(model, fused, features))


def test_matryoshka_weights_do_not_change_the_loss_as_in_the_original(model):
    base = _mnrl(model)
    features = _features(model, 2)
    with pytest.warns(UserWarning, match="matryoshka_weights does not change the loss"):
        weighted = FusedStarbucksLoss(model, base, [1, 2], [8, 16], matryoshka_weights=[3.0, 0.5], backend="torch")
    plain = FusedStarbucksLoss(model, base, [1, 2], [8, 16], backend="torch")
    assert st_step(model, weighted, features)[0] == st_step(model, plain, features)[0]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(matryoshka_layers=[1, 2], matryoshka_dims=[8]), ValueError, "same length"),
    (dict(matryoshka_layers=[0, 2], matryoshka_dims=[8, 16]), ValueError, "matryoshka_layers must hold positive"),
    (dict(matryoshka_layers="12", matryoshka_dims=[8]), TypeError, "matryoshka_layers must be a list"),
    (dict(matryoshka_layers=[1], matryoshka_dims=[8.0]), TypeError, "matryoshka_dims must be a non-empty list"),
    (dict(n_selections_per_step=1.5), TypeError, "n_selections_per_step must be an int"),
    (dict(last_layer_weight=float("nan")), ValueError, "last_layer_weight must be finite"),
    (dict(kl_temperature="0.3"), TypeError, "kl_temperature must be a real number"),
    (dict(mini_batch_size=0), ValueError, "mini_batch_size must be a positive int"),
    (dict(loss=object()), TypeError, "loss must be"),
])
def test_bad_arguments_name_the_argument(model, kwargs, error, match):
    args = {**dict(model=model, loss=_mnrl(model), matryoshka_layers=[1, 2], matryoshka_dims=[8, 16]), **kwargs}
    with pytest.raises(error, match=match):
        FusedStarbucksLoss(**args)


def test_errors_known_only_at_forward(model):
    features = _features(model, 2)
    too_many = FusedStarbucksLoss(model, _mnrl(model), [1, 4], [8, 16], n_selections_per_step=2)
    with pytest.raises(ValueError, match="n_selections_per_step=2 exceeds the 1 matryoshka_layers"):
        too_many([dict(f) for f in features], None)
    too_wide = FusedStarbucksLoss(model, _mnrl(model), [1], [_width(model) + 1])
    with pytest.raises(ValueError, match="exceed the model's embedding width"):
        too_wide([dict(f) for f in features], None)


def test_config_and_citation(model):
    loss = FusedStarbucksLoss(model, _mnrl(model), [1, 2], [8, 16], kl_div_weight=0.5)
    config = loss.get_config_dict()
    assert config["matryoshka_layers"] == [1, 2] and config["kl_div_weight"] == 0.5 and config["loss"] == (
        "MultipleNegativesRankingLoss")
    assert "2410.13230" in loss.citation


# --------------------------------------------------------------------------- retrieval: score distillation

DISTILL_BACKENDS = ["reference", "torch", "cpp"]


def naive_distillation(queries, docs, dims, weights, distill, scale, positive_index, similarity):
    """Per pair, the B x N scores materialised: weights * cross-entropy + distill * F.kl_div to pair (L-1, M-1)."""
    def scores(layer, dim):
        q, d = queries[layer, :, :dim], docs[layer, :, :dim]
        if similarity == "cos":
            q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        return scale * q @ d.T

    teacher = F.softmax(scores(queries.shape[0] - 1, dims[-1]).detach(), dim=1)
    total = 0.0
    for layer in range(queries.shape[0]):
        for m, dim in enumerate(dims):
            s = scores(layer, dim)
            total = total + weights[layer][m] * F.cross_entropy(s, positive_index)
            total = total + distill[layer][m] * F.kl_div(F.log_softmax(s, dim=1), teacher, reduction="batchmean")
    return total


@pytest.mark.parametrize("backend", DISTILL_BACKENDS)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("scale", [1.0, 20.0, 100.0])
def test_score_distillation_matches_naive_kl_div(backend, similarity, scale):
    generator = torch.Generator().manual_seed(int(scale) + len(similarity))
    n_layers, batch, group, width, dims = 3, 6, 3, 40, [8, 17, 40]
    # Dot products of raw Gaussian vectors at scale 100 are huge: shrink them so the softmax is not one-hot.
    spread = 1.0 if similarity == "cos" else 0.3 / (scale * width) ** 0.5
    queries = (spread * torch.randn(n_layers, batch, width, dtype=torch.float64, generator=generator)).requires_grad_()
    docs = (spread * torch.randn(n_layers, batch * group, width, dtype=torch.float64, generator=generator))
    docs.requires_grad_()
    positive_index = torch.arange(batch) * group
    weights = [[1.0, 0.0, 0.5], [0.0, 2.0, 1.0], [1.0, 0.0, 1.0]]
    distill = [[0.7, 1.3, 0.0], [0.0, 1.0, 2.0], [0.4, 0.9, 5.0]]  # the teacher's own entry adds KL = 0

    def run(fn):
        loss = fn()
        grads = torch.autograd.grad(loss, (queries, docs))
        return loss.detach(), grads

    expected = run(lambda: naive_distillation(queries, docs, dims, weights, distill, scale, positive_index, similarity))
    actual = run(lambda: m2d.matryoshka_2d_infonce(queries, docs, dims, weights, scale=scale,
                                                   positive_index=positive_index, similarity=similarity,
                                                   distill_weights=distill, backend=backend))
    torch.testing.assert_close(actual[0], expected[0], rtol=TOL, atol=0)
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL * want.abs().max())
    # The teacher's entry: exactly the distillation a pair gets against itself, 0.
    _, terms = m2d.matryoshka_2d_infonce(queries, docs, dims, weights, scale=scale, positive_index=positive_index,
                                         similarity=similarity, distill_weights=distill, reduction="none",
                                         backend=backend)
    assert abs(terms[-1, -1].item()) < 1e-12


# --------------------------------------------------------------------------- the example


def _load_example():
    spec = importlib.util.spec_from_file_location("starbucks_retrieval_example", EXAMPLES / "starbucks_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def naive_srl_loss(q_reps, p_reps, dims, grid, temperature, kl_weight):
    """ielab/Starbucks retrieval/modeling.py SrlDenseModel.forward's loss, every listed layer in grid mode."""
    num_layers, _, embedding_dim = q_reps.shape
    target = torch.arange(q_reps.size(1)) * (p_reps.size(1) // q_reps.size(1))
    all_scores = torch.einsum("lqh,ldh -> lqdh", q_reps, p_reps)
    full_layer_scores = all_scores[num_layers - 1].sum(dim=-1)
    total_loss = F.cross_entropy(full_layer_scores / temperature, target)
    target_scores = full_layer_scores.detach()
    pairs = ([(layer, dim) for layer in range(num_layers) for dim in dims] if grid
             else list(zip(range(num_layers), dims)))
    for layer, dim in pairs:
        if layer == num_layers - 1 and dim == embedding_dim:
            continue
        layer_scores = all_scores[layer, :, :, :dim].sum(dim=-1)
        total_loss = total_loss + F.cross_entropy(layer_scores / temperature, target)
        if kl_weight > 0:
            total_loss = total_loss + kl_weight * F.kl_div(F.log_softmax(layer_scores / temperature, dim=1),
                                                           F.softmax(target_scores / temperature, dim=1),
                                                           reduction="batchmean")
    return total_loss


@pytest.mark.parametrize(("dims", "grid", "temperature", "kl_weight"), [
    ([8, 16, 40], False, 1.0, 1.0),
    ([8, 16, 24], False, 0.05, 0.5),  # the full width is not listed: the teacher pair is added
    ([8, 8, 40], True, 0.2, 2.0),  # a repeated dim counts twice, as in the original
    ([16, 40], True, 0.5, 0.0),
])
def test_example_loss_is_starbucks_retrieval_loss(dims, grid, temperature, kl_weight):
    example = _load_example()
    generator = torch.Generator().manual_seed(7)
    queries = torch.randn(3, 4, 40, dtype=torch.float64, generator=generator).mul_(0.3).requires_grad_()
    passages = torch.randn(3, 12, 40, dtype=torch.float64, generator=generator).mul_(0.3).requires_grad_()
    expected = naive_srl_loss(queries, passages, dims, grid, temperature, kl_weight)
    actual = example.retrieval_loss(queries, passages, dims, grid, temperature, kl_weight, backend="reference")
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=0)
    for got, want in zip(torch.autograd.grad(actual, (queries, passages)),
                         torch.autograd.grad(expected, (queries, passages))):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL * want.abs().max())


@pytest.mark.parametrize("extra", [[], ["--pairs", "grid", "--layers", "1,3", "--dims", "8,32", "--group-size", "2"]],
                         ids=["built_in_diagonal", "grid"])
def test_example_runs_on_the_built_in_data(tiny_bert, tmp_path, monkeypatch, extra):
    monkeypatch.delenv("M2D_DATA_DIR", raising=False)  # a user with no data folder: the built-in pairs
    losses_ = _load_example().main(["--model", str(tiny_bert), "--steps", "2", "--batch-size", "4",
                                    *extra])
    assert len(losses_) == 2 and all(math.isfinite(x) and x > 0 for x in losses_)


def test_example_reads_triplets_from_a_file(tiny_bert, tmp_path):
    data = tmp_path / "triplets.jsonl"
    rows = [{"anchor": a, "positive": p, "negative": n} for a, p, n in zip(sentences(6, 1), sentences(6, 2),
                                                                             sentences(6, 3))]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    losses_ = _load_example().main(["--model", str(tiny_bert), "--data", str(data), "--steps", "2", "--batch-size",
                                    "3", "--group-size", "3"])
    assert len(losses_) == 2 and all(math.isfinite(x) and x > 0 for x in losses_)


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "1,9"], "--layers must lie in"),
    (["--dims", "8,999"], "--dims must lie in"),
    (["--layers", "1,3", "--dims", "8"], "one dim per layer"),
    (["--temperature", "0"], "--temperature must be positive"),
])
def test_example_rejects_bad_arguments(tiny_bert, args, message, capsys):
    with pytest.raises(SystemExit):
        _load_example().main(["--model", str(tiny_bert), *args])
    assert message in capsys.readouterr().err
