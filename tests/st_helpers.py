"""Tiny local sentence-transformers models for the integration tests (built from a config: no download)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from transformers import BertConfig, BertModel, BertTokenizerFast

WORDS = ("the a cat dog sat ran on under mat rug red blue big small quick slow fox jumps over lazy sun rain "
         "day night man woman car road city park tree river bird sings loud quiet").split()
HIDDEN, OUT = 48, 40


def write_tiny_bert(folder: Path, words=WORDS, hidden: int = HIDDEN, layers: int = 3, dropout: float = 0.1,
                    seed: int = 0) -> str:
    """A randomly initialised BERT (hidden size ``hidden``) saved with a WordPiece tokenizer over ``words``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(set(words)) + 5, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(str(vocab)).save_pretrained(folder)
    return str(folder)


def tiny_model(bert_dir: str, head: bool = True, pooler: bool = True, seed: int = 1) -> SentenceTransformer:
    """Transformer + mean pooling; with ``head``, Dense 48 -> 40 and Normalize. ``pooler=False`` drops BERT's
    pooler, which sentence-transformers never uses (so DDP without find_unused_parameters has no unused ones)."""
    torch.manual_seed(seed)
    modules = [Transformer(bert_dir, max_seq_length=16), Pooling(HIDDEN, "mean")]
    if head:
        modules += [Dense(HIDDEN, OUT), Normalize()]
    model = SentenceTransformer(modules=modules, device="cpu")
    if not pooler:
        model[0].auto_model.pooler = None
    return model


def sentences(n: int, seed: int, words=WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def st_step(model, loss_fn, features, labels=None, seed: int = 0):
    """Loss, parameter gradients and the next Python random draw of one step, Python and torch RNGs seeded
    alike for every loss compared (the same selections, the same dropout)."""
    model.zero_grad(set_to_none=True)
    random.seed(seed)
    torch.manual_seed(seed)
    loss = loss_fn([dict(column) for column in features], labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, random.random()
