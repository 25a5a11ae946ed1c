"""A tiny randomly initialised BERT and a word list for training tests (no download)."""

from __future__ import annotations

import inspect
import json
import random
import string
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a an of to in is are was on for with by at from and or not this that it cat dog bird fish man woman "
         "child boy girl runs walks sits eats plays reads sleeps jumps red blue green big small old young happy sad "
         "house park street river tree car ball book food water sun rain day night").split()


def make_tiny_bert(folder: Path, seed: int = 0, layers: int = 3, hidden: int = 32, dropout: float = 0.1) -> Path:
    """Save a random ``BertModel`` (``layers`` x ``hidden``, ``dropout`` on hidden states and attention)
    and its WordPiece tokenizer to ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIAL + WORDS + characters + ["##" + c for c in string.ascii_lowercase + string.digits]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    # transformers 5 takes the vocabulary as ``vocab``, 4.x as ``vocab_file``.
    takes_vocab = "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters
    source = {"vocab": str(folder / "vocab.txt")} if takes_vocab else {"vocab_file": str(folder / "vocab.txt")}
    BertTokenizerFast(**source).save_pretrained(folder)
    return folder


def random_sentences(count: int, seed: int = 0, words: int = 6) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def write_pairs_jsonl(path: Path, count: int, seed: int = 0, triplets: bool = False) -> Path:
    """Pairs whose positive shares most words with its anchor (so training has signal)."""
    anchors = random_sentences(count, seed)
    negatives = random_sentences(count, seed + 1)
    with open(path, "w", encoding="utf-8") as handle:
        for anchor, negative in zip(anchors, negatives, strict=True):
            record = {"anchor": anchor, "positive": anchor.rsplit(" ", 1)[0] + " tree"}
            if triplets:
                record["negative"] = negative
            handle.write(json.dumps(record) + "\n")
    return path
