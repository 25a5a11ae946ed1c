"""A trained 2D model folder seen as the sentence-transformers pipeline it describes, for serving a (layer, dim) pair.

The embedding of the pair ``(l, d)`` is the pipeline run on transformer layer ``l``: the folder's
pooling on ``hidden_states[l]``, cut to the leading ``d`` features, then re-normalised when the
pipeline ends with Normalize (as sentence-transformers' Matryoshka losses compare truncated
embeddings). Read from ``modules.json``, ``1_Pooling/config.json`` and ``sentence_bert_config.json``
when the folder has them, else a plain Hugging Face folder: mean pooling, no Normalize.

Only transformers is needed here (no sentence-transformers): the cost grid and the export use it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from m2d_kernels.train.encoder import model_shape, pool
from m2d_kernels.train.st_folder import check_base_modules

# sentence-transformers' pooling_mode_* keys -> the poolings the 2D encoder computes.
_POOLING_FROM_KEY = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclass(frozen=True)
class Pipeline:
    """What a model folder computes after its transformer.

    ``num_layers`` / ``width``: the transformer's layers and hidden size; ``max_seq_length``:
    tokens per text (longer ones are truncated).
    """

    path: Path
    num_layers: int
    width: int
    pooling: str
    normalize: bool
    max_seq_length: int
    do_lower_case: bool


def read_pipeline(model_path: str | os.PathLike) -> Pipeline:
    """The :class:`Pipeline` of a local model folder; ValueError for a module or pooling mode the 2D evaluation
    and export do not reproduce (a Dense, max pooling, ...), FileNotFoundError when it is not a model folder."""
    path = Path(model_path)
    num_layers, width = model_shape(path)
    base = check_base_modules(path)
    pooling = "mean"
    pooling_file = path / "1_Pooling" / "config.json"
    if (path / "modules.json").is_file() and pooling_file.is_file():
        settings = json.loads(pooling_file.read_text(encoding="utf-8"))
        modes = [key for key, value in settings.items()
                 if key.startswith("pooling_mode") and value is True]
        if "pooling_mode" in settings and isinstance(settings["pooling_mode"], str):  # newer releases' one key
            modes = [f"pooling_mode_{settings['pooling_mode']}"]
        known = {"pooling_mode_mean": "pooling_mode_mean_tokens", "pooling_mode_cls": "pooling_mode_cls_token"}
        modes = [known.get(mode, mode) for mode in modes]
        if len(modes) != 1 or modes[0] not in _POOLING_FROM_KEY:
            raise ValueError(f"model {path}: pooling {', '.join(modes) or 'none'} in 1_Pooling/config.json; the 2D "
                             "evaluation and export compute mean or cls pooling")
        pooling = _POOLING_FROM_KEY[modes[0]]
    return Pipeline(path, num_layers, width, pooling, base.normalize, max_seq_length(path), base.do_lower_case)


def max_seq_length(path: Path) -> int:
    """Tokens per text, by sentence-transformers' rule: ``sentence_bert_config.json``'s ``max_seq_length`` when
    it has one, else the tokenizer's ``model_max_length`` capped at the model's ``max_position_embeddings``."""
    settings_file = path / "sentence_bert_config.json"
    if settings_file.is_file():
        value = json.loads(settings_file.read_text(encoding="utf-8")).get("max_seq_length")
        if value is not None:
            return int(value)
    limit = json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    tokenizer_file = path / "tokenizer_config.json"
    stated = None
    if tokenizer_file.is_file():
        stated = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("model_max_length")
    candidates = [int(v) for v in (stated, limit) if isinstance(v, int | float) and v < 1e9]
    if not candidates:
        raise ValueError(f"model {path}: no max_seq_length, model_max_length or max_position_embeddings to bound "
                         "its texts")
    return min(candidates)


def check_pair(pipeline: Pipeline, layer: int, dim: int, names: tuple[str, str] = ("layer", "dim")) -> None:
    """ValueError naming ``names[0]`` / ``names[1]`` (e.g. the CLI's flags) for a layer or dim the model lacks."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= pipeline.num_layers:
        raise ValueError(f"{names[0]} {layer!r}: {pipeline.path} has transformer layers 1..{pipeline.num_layers}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= pipeline.width:
        raise ValueError(f"{names[1]} {dim!r}: {pipeline.path} has embedding dims 1..{pipeline.width}")


def layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the transformer's list of layers: the one ``nn.ModuleList`` whose
    length is ``config.num_hidden_layers`` (``encoder.layer`` in BERT, ``transformer.layer`` in DistilBERT,
    ``layers`` in newer encoders). ValueError when there is not exactly one."""
    count = model.config.num_hidden_layers
    found = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.ModuleList) and len(child) == count]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: cannot tell which module list holds its {count} layers "
                         f"({len(found)} candidates)")
    return found[0]


@contextlib.contextmanager
def first_layers(model: nn.Module, layers: int) -> Iterator[nn.Module]:
    """The model running only its first ``layers`` transformer layers (the list swapped for its prefix and
    ``num_hidden_layers`` set, then both restored): the encoder a (layer, dim) export serves."""
    parent, name = layer_stack(model)
    stack, count = getattr(parent, name), model.config.num_hidden_layers
    setattr(parent, name, nn.ModuleList(list(stack)[:layers]))
    model.config.num_hidden_layers = layers
    try:
        yield model
    finally:
        setattr(parent, name, stack)
        model.config.num_hidden_layers = count


def head(pipeline: Pipeline, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The pipeline's pooling on one layer's token states ``[n, T, width]`` -> ``[n, width]`` (no Normalize:
    that comes after truncation, :func:`pair_embedding`)."""
    return pool(hidden, attention_mask, pipeline.pooling)


def pair_embedding(pipeline: Pipeline, pooled: torch.Tensor, dim: int) -> torch.Tensor:
    """``[..., width]`` pooled -> the ``(layer, dim)`` embedding ``[..., dim]``: the leading ``dim`` features,
    re-normalised when the pipeline normalises."""
    cut = pooled[..., :dim]
    return torch.nn.functional.normalize(cut, dim=-1) if pipeline.normalize else cut


def tokenize(pipeline: Pipeline, tokenizer, texts: Sequence[str], device: torch.device | str = "cpu"):
    texts = [text.lower() for text in texts] if pipeline.do_lower_case else list(texts)
    return tokenizer(texts, padding=True, truncation=True, max_length=pipeline.max_seq_length,
                     return_tensors="pt").to(device)


@torch.no_grad()
def pooled_layers(pipeline: Pipeline, model: nn.Module, tokenizer, texts: Sequence[str], layers: Sequence[int],
                  batch_size: int = 64) -> torch.Tensor:
    """``[len(layers), len(texts), width]`` float32 pooled embeddings, one forward per batch
    (``output_hidden_states``) in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = tokenize(pipeline, tokenizer, texts[start:start + batch_size], device)
            states = model(**batch, output_hidden_states=True).hidden_states
            chunks.append(torch.stack([head(pipeline, states[layer], batch["attention_mask"]).float().cpu()
                                       for layer in layers]))
        return torch.cat(chunks, dim=1)
    finally:
        model.train(was_training)


def load(model_path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(pipeline, model, tokenizer) of a local folder, the model in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    pipeline = read_pipeline(model_path)
    model = AutoModel.from_pretrained(pipeline.path).to(device).eval()
    return pipeline, model, AutoTokenizer.from_pretrained(pipeline.path)
