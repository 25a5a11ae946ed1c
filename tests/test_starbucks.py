"""Starbucks: FusedStarbucksLoss against a naive transcription of the original StarbucksLoss, and the
retrieval objective's score distillation against a naive per-pair F.kl_div, all in float64.

The oracle follows ielab/Starbucks ``sts/starbucks_loss.py`` statement by statement, but gets layer
``k``'s sentence embeddings another way: the BERT encoder cut to its first ``k`` layers, then the
model's own modules (eval mode, so no dropout draws differ), and the base loss per pair on the
truncated, normalised embeddings, as the original's modified MatryoshkaLoss feeds it.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")

from sentence_transformers.sentence_transformer import losses  # noqa: E402
from sentence_transformers.util import dot_score  # noqa: E402
from st_helpers import sentences, tiny_model, write_tiny_bert  # noqa: E402

from m2d_kernels.integrations.starbucks import FusedStarbucksLoss  # noqa: E402

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


def _step(model, loss_fn, features, labels=None, seed=0):
    model.zero_grad(set_to_none=True)
    random.seed(seed)
    loss = loss_fn([dict(f) for f in features], labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, random.random()


def _assert_same(expected, actual):
    (loss_e, grads_e, rng_e), (loss_a, grads_a, rng_a) = expected, actual
    torch.testing.assert_close(loss_a, loss_e, rtol=TOL, atol=0)
    assert grads_a.keys() == grads_e.keys()
    scale = max(g.abs().max() for g in grads_e.values())
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=TOL, atol=TOL * scale, msg=name)
    assert rng_a == rng_e, "Python's random was consumed differently"


def _mnrl(model, symmetric=False, **kwargs):
    if symmetric:
        kwargs.update(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    return losses.MultipleNegativesRankingLoss(model, **kwargs)


def _width(model):
    return model.get_embedding_dimension()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(("n_columns", "symmetric", "similarity", "last_layer_weight", "kl_temperature"), [
    (2, False, None, 1.0, 0.3),
    (3, False, dot_score, 2.5, 0.7),
    (2, True, None, -0.5, 0.3),
    (3, True, dot_score, 1.0, 0.0),
])
def test_fused_matches_the_original(any_model, backend, n_columns, symmetric, similarity, last_layer_weight,
                                    kl_temperature):
    model = any_model
    extra = {} if similarity is None else {"similarity_fct": similarity}
    base = _mnrl(model, symmetric, scale=7.0, **extra)
    layers, dims = [1, 2, 3, 4], [8, 24, 17, _width(model)]  # 4 is the final layer: dropped from the pairs
    args = dict(last_layer_weight=last_layer_weight, kl_div_weight=1.5, kl_temperature=kl_temperature)
    features = _features(model, n_columns)
    fused = FusedStarbucksLoss(model, base, layers, dims, backend=backend, **args)
    expected = _step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims, **args), features)
    _assert_same(expected, _step(model, fused, features))


@pytest.mark.parametrize("n_selections_per_step", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_selections_match_the_original(model, n_selections_per_step, seed):
    # Layers out of order and a repeated dim; the k-th drawn layer gets dims[k], as the original.
    base = _mnrl(model, scale=11.0)
    layers, dims = [3, 1, 2], [16, 8, 16]
    features = _features(model, 2, seed=seed)
    fused = FusedStarbucksLoss(model, base, layers, dims, n_selections_per_step=n_selections_per_step,
                               backend="torch")
    expected = _step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims, n_selections_per_step),
                     features, seed=seed)
    _assert_same(expected, _step(model, fused, features, seed=seed))


def test_unfused_base_loss_is_computed_per_pair(model):
    base = losses.CoSENTLoss(model)
    layers, dims = [2, 1, 4], [24, 8, 40]
    features = _features(model, 2)
    labels = torch.rand(BATCH, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fused = FusedStarbucksLoss(model, base, layers, dims, kl_div_weight=0.5)
    expected = _step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims, kl_div_weight=0.5),
                     features, labels)
    with pytest.warns(UserWarning, match="CoSENTLoss is not fused"):
        actual = _step(model, fused, features, labels)
    _assert_same(expected, actual)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _step(model, fused, features, labels)


def test_gradient_cache_matches_the_original(model):
    base = _mnrl(model, scale=9.0)
    layers, dims = [1, 3], [8, 32]
    features = _features(model, 3)
    fused = FusedStarbucksLoss(model, base, layers, dims, mini_batch_size=2, backend="torch")
    expected = _step(model, lambda f, lab: naive_starbucks(model, base, f, lab, layers, dims), features)
    _assert_same(expected, _step(model, fused, features))


def test_matryoshka_weights_do_not_change_the_loss_as_in_the_original(model):
    base = _mnrl(model)
    features = _features(model, 2)
    with pytest.warns(UserWarning, match="matryoshka_weights does not change the loss"):
        weighted = FusedStarbucksLoss(model, base, [1, 2], [8, 16], matryoshka_weights=[3.0, 0.5], backend="torch")
    plain = FusedStarbucksLoss(model, base, [1, 2], [8, 16], backend="torch")
    assert _step(model, weighted, features)[0] == _step(model, plain, features)[0]


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
