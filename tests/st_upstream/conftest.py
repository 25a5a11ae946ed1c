"""Tiny local stand-ins for the Hub models that sentence-transformers' own tests load (nothing is downloaded).

- ``stsb_bert_tiny_model``: a randomly initialised 2-layer BERT with mean pooling (upstream:
  sentence-transformers-testing/stsb-bert-tiny-safetensors, also a small BERT with mean pooling).
- ``static_retrieval_mrl_en_v1_model``: a StaticEmbedding model of width 1024 over a word-level vocabulary
  (upstream: sentence-transformers/static-retrieval-mrl-en-v1, a 1024-wide StaticEmbedding model), so the
  tests' messages naming 1024 hold unchanged.
"""

from __future__ import annotations

import sys
from copy import deepcopy
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import StaticEmbedding  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from st_helpers import WORDS, tiny_model, write_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def _stsb_bert_tiny_model(tmp_path_factory) -> SentenceTransformer:
    words = [*WORDS, "it", "is", "sunny", "today", "he", "drove", "to", "work", "weather", "lovely", "took", "query"]
    bert_dir = write_tiny_bert(tmp_path_factory.mktemp("stsb_bert_tiny"), words=words, layers=2)
    model = tiny_model(bert_dir, head=False)
    model.model_card_data.generate_widget_examples = False
    return model


@pytest.fixture()
def stsb_bert_tiny_model(_stsb_bert_tiny_model: SentenceTransformer) -> SentenceTransformer:
    return deepcopy(_stsb_bert_tiny_model)


@pytest.fixture(scope="session")
def _static_retrieval_mrl_en_v1_model() -> SentenceTransformer:
    vocab = {word: index for index, word in enumerate(["[UNK]", "[PAD]", *sorted(set(WORDS)), "this", "is", "an",
                                                        "input", "text"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=1024)], device="cpu")


@pytest.fixture()
def static_retrieval_mrl_en_v1_model(_static_retrieval_mrl_en_v1_model: SentenceTransformer) -> SentenceTransformer:
    return deepcopy(_static_retrieval_mrl_en_v1_model)
