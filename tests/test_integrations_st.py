"""The sentence-transformers drop-in losses against sentence-transformers' own losses.

A tiny randomly initialised BERT (built from a config and a WordPiece vocab written here, no
download) is trained by both; the loss and every parameter gradient must agree.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer  # noqa: E402
from sentence_transformers.util import dot_score  # noqa: E402
from st_helpers import st_step  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizerFast  # noqa: E402

from m2d_kernels.integrations.sentence_transformers import FusedMatryoshka2dLoss, FusedMatryoshkaLoss  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "python" / "sentence_transformers_trainer.py"
TOY_PAIRS = [
    ("a cat sat on the mat", "the cat is sitting on a mat"),
    ("a dog ran in the park", "the dog is running outside"),
    ("the sun is shining over the sea", "it is sunny at the beach"),
    ("a man drives a red car", "someone is driving a car"),
    ("two children play football", "kids are playing a game"),
    ("a woman reads a book", "the woman is reading"),
    ("the train left the station", "a train is departing"),
    ("a bird sings in the tree", "the bird is singing"),
    ("people walk along the river", "a group is walking by the water"),
    ("a chef cooks pasta", "someone is making food"),
    ("the moon rises at night", "it is night and the moon is up"),
    ("a boy climbs a big tree", "the child is climbing"),
]
HIDDEN, OUT = 48, 40
DIMS = [40, 24, 8]  # the Dense head maps 48 -> 40; 24 and 8 are not multiples of 16
WEIGHTS = [1.0, 0.5, 2.0]
BATCH = 5
RTOL = 1e-5


def _load_example():
    spec = importlib.util.spec_from_file_location("st_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def words():
    return sorted({word for pair in TOY_PAIRS for sentence in pair for word in sentence.split()})


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, words):
    """A 3-layer BERT with hidden size 48 and dropout, saved with its WordPiece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(str(vocab)).save_pretrained(folder)
    return str(folder)


def _model(bert_dir, head: bool) -> SentenceTransformer:
    """With ``head``: pooling, then Dense 48 -> 40 and Normalize, which are re-run for every layer."""
    torch.manual_seed(1)
    modules = [Transformer(bert_dir, max_seq_length=16), Pooling(HIDDEN, "mean")]
    if head:
        modules += [Dense(HIDDEN, OUT), Normalize()]
    return SentenceTransformer(modules=modules, device="cpu")


@pytest.fixture(scope="module")
def model(bert_dir):
    return _model(bert_dir, head=True)


def _features(model, words, n_columns, seed=0):
    rng = random.Random(seed)
    columns = [[" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(BATCH)]
               for _ in range(n_columns)]
    return [model.preprocess(column) for column in columns]


def _assert_same_step(expected, actual):
    (loss_e, grads_e, rng_e), (loss_a, grads_a, rng_a) = expected, actual
    torch.testing.assert_close(loss_a, loss_e, rtol=RTOL, atol=0)
    assert grads_a.keys() == grads_e.keys()
    # Relative to the largest gradient entry: some entries (attention key biases) are exactly 0 in
    # exact arithmetic and only hold rounding noise, which no elementwise rtol can compare.
    scale = max(g.abs().max() for g in grads_e.values())
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=RTOL, atol=RTOL * scale, msg=name)
    assert rng_a == rng_e, "the losses consumed Python's random differently"


def _mnrl(model, symmetric, **kwargs):
    if symmetric:
        kwargs.update(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    return losses.MultipleNegativesRankingLoss(model, **kwargs)


@pytest.mark.parametrize(("n_columns", "symmetric", "layer_weighting"), [
    (2, False, "uniform"), (3, False, "log"), (2, True, "linear"), (4, True, "uniform"),
])
def test_2d_full_grid_matches_sentence_transformers(model, words, n_columns, symmetric, layer_weighting):
    model.train()  # dropout on: both losses run the same encoder calls in the same order
    base = _mnrl(model, symmetric, scale=30.0)
    kwargs = dict(matryoshka_weights=WEIGHTS, n_layers_per_step=-1, n_dims_per_step=-1,
                  last_layer_weight=1.5, prior_layers_weight=0.7, kl_div_weight=2.0, kl_temperature=0.5,
                  layer_weighting=layer_weighting)
    features = _features(model, words, n_columns)
    expected = st_step(model, losses.Matryoshka2dLoss(model, base, DIMS, **kwargs), features)
    actual = st_step(model, FusedMatryoshka2dLoss(model, base, DIMS, **kwargs, backend="torch"), features)
    _assert_same_step(expected, actual)


@pytest.mark.parametrize(("n_layers", "n_dims"), [(1, 1), (2, 2), (-1, 1)])
def test_2d_sampling_same_seed_same_selection(model, words, n_layers, n_dims):
    model.eval()
    base = _mnrl(model, False)
    kwargs = dict(matryoshka_weights=WEIGHTS, n_layers_per_step=n_layers, n_dims_per_step=n_dims)
    features = _features(model, words, 3, seed=1)
    for seed in range(3):
        expected = st_step(model, losses.Matryoshka2dLoss(model, base, DIMS, **kwargs), features, seed=seed)
        actual = st_step(model, FusedMatryoshka2dLoss(model, base, DIMS, **kwargs), features, seed=seed)
        _assert_same_step(expected, actual)


@pytest.mark.parametrize(("n_columns", "symmetric", "n_dims"), [(2, False, -1), (3, True, -1), (3, False, 2)])
def test_1d_matches_sentence_transformers(bert_dir, words, n_columns, symmetric, n_dims):
    model = _model(bert_dir, head=False)
    model.train()
    base = _mnrl(model, symmetric)
    dims = [48, 24, 24, 10]  # a repeated dim counts twice in both
    weights = [1.0, 0.5, 0.25, 3.0]
    features = _features(model, words, n_columns, seed=2)
    expected = st_step(model, losses.MatryoshkaLoss(model, base, dims, weights, n_dims), features)
    actual = st_step(model, FusedMatryoshkaLoss(model, base, dims, weights, n_dims), features)
    _assert_same_step(expected, actual)


@pytest.mark.parametrize("loss_class", ["2d", "1d"])
def test_gradient_cache_matches_uncached(model, words, loss_class):
    model.eval()  # mini-batches draw different dropout masks than the full batch
    base = _mnrl(model, True)
    if loss_class == "2d":
        make = lambda **extra: FusedMatryoshka2dLoss(model, base, DIMS, WEIGHTS, n_layers_per_step=2,
                                                     n_dims_per_step=2, layer_weighting=lambda i: 1 + i, **extra)
    else:
        make = lambda **extra: FusedMatryoshkaLoss(model, base, DIMS, WEIGHTS, **extra)
    features = _features(model, words, 3, seed=3)
    expected = st_step(model, make(), features, seed=4)
    actual = st_step(model, make(mini_batch_size=2), features, seed=4)
    _assert_same_step(expected, actual)
    with torch.no_grad():  # evaluation: the cached path returns the plain loss
        random.seed(4)
        torch.testing.assert_close(make(mini_batch_size=2)(features, None), expected[0], rtol=RTOL, atol=0)


class _ScaledMNRL(losses.MultipleNegativesRankingLoss):
    def compute_loss_from_embeddings(self, embeddings, labels):
        return 2 * super().compute_loss_from_embeddings(embeddings, labels)


@pytest.mark.parametrize(("make_base", "extra", "named"), [
    (lambda m: losses.CoSENTLoss(m), {}, "CoSENTLoss"),
    (lambda m: _ScaledMNRL(m), {}, "the base loss _ScaledMNRL"),  # a subclass computing another loss
    (lambda m: losses.MultipleNegativesRankingLoss(m, similarity_fct=dot_score), {"matryoshka_weights": [1.0, 2.0, -1]},
     "matryoshka_weights"),
    (lambda m: losses.MultipleNegativesRankingLoss(m), {"matryoshka_weights": [1.0, -0.5, 2.0]}, "matryoshka_weights"),
])
@pytest.mark.parametrize("loss_class", ["2d", "1d"])
def test_unfused_arguments_run_sentence_transformers_with_one_warning(model, words, make_base, extra, named,
                                                                      loss_class):
    """What the kernels do not cover is no error: sentence-transformers' own loss runs, after one warning."""
    model.eval()
    base = make_base(model)
    fused_class, st_class = ((FusedMatryoshka2dLoss, losses.Matryoshka2dLoss) if loss_class == "2d"
                             else (FusedMatryoshkaLoss, losses.MatryoshkaLoss))
    features = _features(model, words, 2, seed=6)
    labels = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0])  # CoSENT's scores; MNRL ignores them
    step = lambda loss_fn: st_step(model, lambda f, _: loss_fn(f, labels), features, seed=7)
    expected = step(st_class(model, base, DIMS, **extra))
    fused = fused_class(model, base, DIMS, **extra, mini_batch_size=2)
    with pytest.warns(UserWarning, match=f"{named}.*not fused.*{st_class.__name__}.*mini_batch_size is ignored"):
        actual = step(fused)
    _assert_same_step(expected, actual)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per step
        step(fused)


def _error(loss_class, *args, **kwargs):
    with pytest.raises(Exception) as info:
        loss_class(*args, **kwargs)
    return info.type, str(info.value)


@pytest.mark.parametrize("args", [
    dict(matryoshka_dims=[]), dict(matryoshka_dims=[40, 0]), dict(matryoshka_dims=[64]),
    dict(matryoshka_dims=DIMS, matryoshka_weights=[1.0]), dict(matryoshka_dims=DIMS, layer_weighting="cubic"),
])
def test_invalid_arguments_raise_what_sentence_transformers_raises(model, args):
    base = _mnrl(model, False)
    pairs = [(FusedMatryoshka2dLoss, losses.Matryoshka2dLoss), (FusedMatryoshkaLoss, losses.MatryoshkaLoss)]
    for fused, theirs in pairs[:1] if "layer_weighting" in args else pairs:
        expected_type, expected_message = _error(theirs, model, base, **args)
        got_type, got_message = _error(fused, model, base, **args)
        assert got_type is expected_type and got_message.startswith(expected_message), (got_type, got_message)


def test_bad_arguments_of_our_own_name_the_argument(model):
    base = _mnrl(model, False)
    with pytest.raises(ValueError, match="mini_batch_size"):
        FusedMatryoshkaLoss(model, base, DIMS, mini_batch_size=0)
    with pytest.raises(ValueError, match="sentence_features"):
        FusedMatryoshka2dLoss(model, base, DIMS)([{}], None)


def test_config_and_citation_match_sentence_transformers(model):
    base = _mnrl(model, False)
    ours = FusedMatryoshka2dLoss(model, base, DIMS, WEIGHTS, layer_weighting="log")
    theirs = losses.Matryoshka2dLoss(model, base, DIMS, WEIGHTS, layer_weighting="log")
    assert {k: v for k, v in ours.get_config_dict().items() if k in theirs.get_config_dict()} == \
        theirs.get_config_dict()
    assert ours.citation == theirs.citation
    assert FusedMatryoshkaLoss(model, base, DIMS).citation == losses.MatryoshkaLoss(model, base, DIMS).citation


def test_trainer_example_lowers_the_loss(example, bert_dir, tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    model_dir = tmp_path / "model"
    _model(bert_dir, head=True).save(str(model_dir))
    pairs = tmp_path / "toy_pairs.jsonl"  # the tiny model's vocabulary covers these words only
    pairs.write_text("".join(json.dumps(list(pair)) + "\n" for pair in TOY_PAIRS), encoding="utf-8")
    step_losses = example.main(["--model", str(model_dir), "--data", str(pairs), "--steps", "12",
                                "--batch-size", "6", "--mini-batch-size", "4", "--learning-rate", "3e-3",
                                "--output-dir", str(tmp_path / "run")])
    assert len(step_losses) == 12
    assert sum(step_losses[-3:]) / 3 < 0.8 * step_losses[0], step_losses


def test_model_fit_trains_with_the_fused_loss(bert_dir, words, tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    model = _model(bert_dir, head=True)
    rng = random.Random(5)
    examples = [InputExample(texts=[" ".join(rng.choice(words) for _ in range(4)) for _ in range(2)])
                for _ in range(8)]
    loss = FusedMatryoshka2dLoss(model, _mnrl(model, False), DIMS, mini_batch_size=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    started = time.time()
    model.fit([(DataLoader(examples, batch_size=4, shuffle=False), loss)], epochs=1, show_progress_bar=False,
              optimizer_params={"lr": 1e-3}, checkpoint_path=str(tmp_path / "checkpoints"))  # not ./checkpoints
    assert not (Path.cwd() / "checkpoints").exists() or (Path.cwd() / "checkpoints").stat().st_mtime < started
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "2.linear.weight" in changed and any(name.startswith("0.model.encoder.layer.0.") for name in changed)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n_layers_per_step=0), r"n_layers_per_step must be -1 \(all\) or 1 to {layers} \(the {layers} layers before "
                                r"the last \(which is always trained\)\), got 0"),
    (dict(n_layers_per_step=-2), r"n_layers_per_step must be -1 \(all\) or 1 to {layers} .*got -2"),
    (dict(n_layers_per_step=99), r"n_layers_per_step must be -1 \(all\) or 1 to {layers} .*got 99"),
    (dict(n_dims_per_step=0), r"n_dims_per_step must be -1 \(all\) or 1 to 3 \(the 3 matryoshka_dims\), got 0"),
    (dict(n_dims_per_step=10), r"n_dims_per_step must be -1 \(all\) or 1 to 3 .*got 10"),
])
def test_per_step_counts_sentence_transformers_would_silently_widen_are_refused(model, kwargs, message):
    """sentence-transformers' Matryoshka2dLoss accepts these and trains every layer / dim instead; we refuse them."""
    base = _mnrl(model, False)
    layers = model[0].auto_model.config.num_hidden_layers
    losses.Matryoshka2dLoss(model, base, DIMS, **kwargs)  # accepted there (silently: all layers / dims)
    with pytest.raises(ValueError, match=message.format(layers=layers)):
        FusedMatryoshka2dLoss(model, base, DIMS, **kwargs)
    if "n_dims_per_step" in kwargs:
        with pytest.raises(ValueError, match="n_dims_per_step must be -1"):
            FusedMatryoshkaLoss(model, base, DIMS, **kwargs)


def test_per_step_counts_equal_to_what_there_is_mean_all(model, words):
    """The largest accepted counts train what -1 trains, the same selection as sentence-transformers'."""
    model.eval()
    base = _mnrl(model, False)
    layers = model[0].auto_model.config.num_hidden_layers
    kwargs = dict(matryoshka_weights=WEIGHTS, n_layers_per_step=layers, n_dims_per_step=len(DIMS))
    features = _features(model, words, 3, seed=1)
    expected = st_step(model, losses.Matryoshka2dLoss(model, base, DIMS, **kwargs), features, seed=0)
    actual = st_step(model, FusedMatryoshka2dLoss(model, base, DIMS, **kwargs), features, seed=0)
    _assert_same_step(expected, actual)
