"""``log_pair_losses=True``: the fused adapters return their per-(layer, dim) components as a dict that sums to the
loss they return otherwise (value and gradients), each pair's entry equal to its weighted loss computed here by hand
(MultipleNegativesRankingLoss on that layer's truncated, re-normalised head output), with or without gradient
caching, and sentence-transformers' trainer logs every entry."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402
from st_helpers import WORDS, sentences, tiny_model, write_tiny_bert  # noqa: E402

from m2d_kernels.integrations.sentence_transformers import (  # noqa: E402
    FusedAdaptiveLayerLoss,
    FusedMatryoshka2dLoss,
    FusedMatryoshkaLoss,
)

DIMS, WEIGHTS = [40, 24, 8], [1.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(write_tiny_bert(tmp_path_factory.mktemp("bert"), dropout=0.0), head=True)


def features(model, seed=0, batch=6):
    anchors = sentences(batch, seed)
    positives = [a + " " + random.Random(seed + i).choice(WORDS) for i, a in enumerate(anchors)]
    return [model.preprocess(anchors), model.preprocess(positives)]


def step(model, loss_fn, columns, seed=0):
    model.zero_grad(set_to_none=True)
    random.seed(seed)
    torch.manual_seed(seed)
    out = loss_fn([dict(c) for c in columns])
    total = torch.stack(list(out.values())).sum() if isinstance(out, dict) else out
    total.backward()
    return out, total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def layer_outputs(model, columns, layer):
    """Head output of hidden state ``layer`` (a copy of the model cut to that many layers; 0: the embeddings)."""
    cut = copy.deepcopy(model)
    cut[0].auto_model.encoder.layer = cut[0].auto_model.encoder.layer[:layer]
    cut[0].auto_model.config.num_hidden_layers = layer
    with torch.no_grad():
        return [cut(dict(c))["sentence_embedding"] for c in columns]


def mnrl(anchors, positives, dim, scale=20.0):
    a, p = F.normalize(anchors[:, :dim], dim=-1), F.normalize(positives[:, :dim], dim=-1)
    return F.cross_entropy(scale * a @ p.T, torch.arange(len(a)))


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_2d_components_sum_to_the_loss_and_match_each_pair(model, mini_batch_size):
    columns = features(model)
    plain = FusedMatryoshka2dLoss(model, MultipleNegativesRankingLoss(model), DIMS, WEIGHTS, n_layers_per_step=-1,
                                  n_dims_per_step=-1, mini_batch_size=mini_batch_size)
    logged = FusedMatryoshka2dLoss(model, MultipleNegativesRankingLoss(model), DIMS, WEIGHTS, n_layers_per_step=-1,
                                   n_dims_per_step=-1, mini_batch_size=mini_batch_size, log_pair_losses=True)
    _, expected_total, expected_grads = step(model, plain, columns)
    parts, total, grads = step(model, logged, columns)
    assert set(parts) == {f"layer{layer}_dim{d}" for layer in range(4) for d in (8, 24, 40)} | {"kl"}
    torch.testing.assert_close(total, expected_total.detach(), rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7)
    # Hidden state 3 is the final layer (weight 1 x dim weight); 0..2 are the prior layers (1/3 each).
    for layer in range(4):
        anchors, positives = layer_outputs(model, columns, layer)
        factor = 1.0 if layer == 3 else 1.0 / 3
        for dim, weight in zip(DIMS, WEIGHTS):
            expected = factor * weight * mnrl(anchors, positives, dim)
            assert float(parts[f"layer{layer}_dim{dim}"].detach()) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert float(parts["kl"].detach()) > 0


def test_sampled_steps_keep_the_same_keys_with_zeros(model):
    columns = features(model, seed=3)
    logged = FusedMatryoshka2dLoss(model, MultipleNegativesRankingLoss(model), DIMS, n_layers_per_step=1,
                                   n_dims_per_step=1, log_pair_losses=True)
    parts, total, _ = step(model, logged, columns, seed=4)
    nonzero = [key for key, value in parts.items() if key != "kl" and float(value) != 0]
    # The final layer at one dim, and one prior layer at one dim.
    assert len(nonzero) == 2 and any(key.startswith("layer3_") for key in nonzero)
    assert len(parts) == 4 * 3 + 1


def test_1d_and_layer_only_keys(model):
    columns = features(model, seed=5)
    one_d = FusedMatryoshkaLoss(model, MultipleNegativesRankingLoss(model), DIMS, WEIGHTS, log_pair_losses=True)
    parts, _, _ = step(model, one_d, columns)
    assert set(parts) == {"dim40", "dim24", "dim8"}
    final = layer_outputs(model, columns, 3)
    for dim, weight in zip(DIMS, WEIGHTS):
        assert float(parts[f"dim{dim}"]) == pytest.approx(float(weight * mnrl(*final, dim)), rel=1e-4)
    layers = FusedAdaptiveLayerLoss(model, MultipleNegativesRankingLoss(model), n_layers_per_step=-1,
                                    kl_div_weight=0.0, log_pair_losses=True)
    parts, _, _ = step(model, layers, columns)
    assert set(parts) == {"layer0", "layer1", "layer2", "layer3", "kl"} and float(parts["kl"]) == 0


def test_trainer_logs_each_component(model, tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    trained = copy.deepcopy(model)
    anchors = sentences(16, seed=8)
    train = datasets.Dataset.from_dict({"anchor": anchors, "positive": [a + " tree" for a in anchors]})
    loss = FusedMatryoshka2dLoss(trained, MultipleNegativesRankingLoss(trained), [40, 8], n_layers_per_step=-1,
                                 n_dims_per_step=-1, log_pair_losses=True)
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2,
                                                per_device_train_batch_size=8, logging_steps=1, report_to=[],
                                                use_cpu=True, save_strategy="no")
    trainer = SentenceTransformerTrainer(model=trained, args=args, train_dataset=train, loss=loss)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "layer3_dim40" in entry]
    assert len(logs) == 2
    for entry in logs:
        parts = sum(value for key, value in entry.items() if key.startswith("layer") or key == "kl")
        assert parts == pytest.approx(entry["loss"], rel=1e-4)
