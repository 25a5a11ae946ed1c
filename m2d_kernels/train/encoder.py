"""A Hugging Face encoder seen as one pooled embedding per selected layer.

``hidden_states[0]`` is the embedding layer's output and ``hidden_states[k]`` the output
of transformer layer ``k``, so layer ids run from 0 to ``num_layers``; the 2D Matryoshka
papers and the evaluator use 1..num_layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from m2d_kernels.train.errors import ConfigError

POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[n, T, D]`` token states -> ``[n, D]``: masked mean (sentence-transformers) or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def model_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(number of layers, hidden size) of a local model folder, read from its ``config.json``
    alone (milliseconds: no weights are loaded)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model not found: {path} is not a folder with a config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        return int(config["num_hidden_layers"]), int(config["hidden_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"model {path}: config.json gives no num_hidden_layers / hidden_size ({error})") from None


def check_layers_and_dims(layers: Sequence[int], dims: Sequence[int], num_layers: int, hidden_size: int) -> None:
    """Raise ValueError for a layer outside 0..num_layers or dims that are not strictly
    increasing positive ints up to ``hidden_size``."""
    bad_layers = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad_layers or not layers:
        raise ConfigError("layers", f"{bad_layers or list(layers)}: unknown layer(s), this model has layers "
                                    f"1..{num_layers} (0 is the embedding output)")
    if len(set(layers)) != len(layers):
        raise ConfigError("layers", f"must be distinct, got {list(layers)}")
    if not dims or any(b <= a for a, b in zip(dims, dims[1:], strict=False)) or dims[0] < 1:
        raise ConfigError("dims", f"must be strictly increasing positive ints, got {list(dims)}")
    if dims[-1] > hidden_size:
        raise ConfigError("dims", f"{list(dims)}: dim {dims[-1]} is larger than the model's hidden size {hidden_size}")


class LayerEncoder(nn.Module):
    """Tokenise, run the model once with ``output_hidden_states``, pool the selected layers."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str = "mean", max_length: int = 128) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, pooling: str = "mean", max_length: int = 128) -> LayerEncoder:
        """Load a local model folder (``config.json``, weights, tokenizer files)."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model not found: {path} is not a folder with a config.json")
        return cls(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), pooling, max_length)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check(self, layers: Sequence[int], dims: Sequence[int]) -> None:
        """Raise ValueError for a layer the model lacks or a dim larger than its hidden size."""
        check_layers_and_dims(layers, dims, self.num_layers, self.hidden_size)

    def forward(self, texts: Sequence[str], layers: Sequence[int], columns: int = 1) -> torch.Tensor:
        """Pooled embeddings ``[len(layers), len(texts), hidden_size]`` (differentiable).

        ``texts`` may be ``columns`` equal groups (anchors, positives, negatives): each group
        is padded on its own, as sentence-transformers does, rather than every text to the
        longest of all (short hypotheses padded to long premises cost a third more time).
        """
        if columns < 1 or len(texts) % columns:
            raise ValueError(f"columns must divide the {len(texts)} texts into equal groups, got {columns}")
        size = len(texts) // columns
        pooled = []
        for start in range(0, len(texts), size):
            batch = self.tokenizer(list(texts[start:start + size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            output = self.model(**batch, output_hidden_states=True)
            pooled.append(torch.stack([pool(output.hidden_states[layer], batch["attention_mask"], self.pooling)
                                       for layer in layers]))
        return torch.cat(pooled, dim=1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], layers: Sequence[int], batch_size: int = 64) -> torch.Tensor:
        """Like ``forward`` in eval mode, batched, float32 on the CPU."""
        was_training = self.model.training
        self.model.eval()
        try:
            # Sorting by length keeps padding (and CPU time) low; the order is restored after.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            chunks = [self(([texts[i] for i in order[start:start + batch_size]]), layers).float().cpu()
                      for start in range(0, len(order), batch_size)]
            embeddings = torch.cat(chunks, dim=1)
            restored = torch.empty_like(embeddings)
            restored[:, order] = embeddings
            return restored
        finally:
            self.model.train(was_training)
