"""The sentence-transformers files of a model folder, written without sentence-transformers installed.

A plain Hugging Face folder (``config.json``, weights, tokenizer) loads in ``SentenceTransformer(path)``
as Transformer + mean pooling, whatever pooling the model was trained with, and without the
Normalize module its base model had. The files written here (``modules.json``,
``sentence_bert_config.json``, ``config_sentence_transformers.json``, ``1_Pooling/config.json``, a
Normalize entry and, for an export, a ``Dense`` that keeps the leading ``dim`` features) make the
folder load as exactly the pipeline the 2D training evaluated.

The files use the module names and keys of sentence-transformers' long-standing folder format
(``sentence_transformers.models.*``, the ``pooling_mode_*`` keys: the format of all-MiniLM-L6-v2's own
folder, written by sentence-transformers 2.0), not the newest release's, so a deployed model does not
need the newest sentence-transformers (tested with 6.0.1 and 6.3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from m2d_kernels._files import atomic_write, refuse_link

# Module types that the 2D training reproduces exactly (the pooling is the training's own; a
# Normalize does not change a cosine, so the evaluated grid is the grid of the normalised model).
_TRANSFORMER_TYPES = ("Transformer",)
_POOLING_TYPES = ("Pooling",)
_NORMALIZE_TYPES = ("Normalize",)


@dataclass(frozen=True)
class BaseModules:
    """What follows the transformer in a base model's ``modules.json`` (empty for a plain HF folder).

    ``normalize``: the base model ends with a Normalize module. ``do_lower_case``: its
    ``sentence_bert_config.json`` setting. ``unsupported``: the (path, type) of modules the 2D
    training does not run (a Dense, a custom module), which would make its saved model differ
    from the model the training evaluated.
    """

    normalize: bool = False
    do_lower_case: bool = False
    unsupported: tuple[tuple[str, str], ...] = ()


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"model {path.parent}: its {what} {path.name} cannot be read ({error})") from None


def read_base_modules(model_path: str | os.PathLike) -> BaseModules:
    """The sentence-transformers modules of a local model folder (none when it has no ``modules.json``).

    Raises ValueError when ``modules.json`` is not a list of modules with a ``type``.
    """
    folder = Path(model_path)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return BaseModules()
    modules = _read_json(modules_file, "sentence-transformers module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise ValueError(f"model {folder}: modules.json is not a list of modules with a type")
    normalize, unsupported = False, []
    for module in modules:
        kind = str(module["type"]).rsplit(".", 1)[-1]
        if kind in _TRANSFORMER_TYPES + _POOLING_TYPES:
            continue
        if kind in _NORMALIZE_TYPES and module is modules[-1]:
            normalize = True
        else:
            unsupported.append((str(module.get("path", "")), str(module["type"])))
    settings = folder / "sentence_bert_config.json"
    lower = bool(_read_json(settings, "settings").get("do_lower_case", False)) if settings.is_file() else False
    return BaseModules(normalize, lower, tuple(unsupported))


def check_base_modules(model_path: str | os.PathLike) -> BaseModules:
    """:func:`read_base_modules`, raising ValueError when the model has modules the 2D training does not run."""
    base = read_base_modules(model_path)
    if base.unsupported:
        path, kind = base.unsupported[0]
        raise ValueError(f"model {model_path}: its sentence-transformers module {kind} ({path or 'the root'}) "
                         "follows the pooling; the 2D training trains and evaluates the pooled transformer "
                         "layers (then Normalize), so it cannot train this model as a whole (train the "
                         "folder without that module, or use the sentence-transformers adapters, which run it)")
    return base


@dataclass(frozen=True)
class PipelineSpec:
    """The sentence-transformers pipeline a folder describes.

    ``width``: the pooled width (the transformer's hidden size). ``keep_dims``: when set, a Dense
    module whose weight is the first ``keep_dims`` rows of the identity keeps the leading features
    (an exact copy: each output is one input times 1.0 plus zeros). ``normalize``: a final Normalize.
    """

    pooling: str
    width: int
    max_seq_length: int
    do_lower_case: bool = False
    normalize: bool = False
    keep_dims: int | None = None


POOLING_MODE_KEYS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
_POOLING_KEY = {"mean": "mean_tokens", "cls": "cls_token"}


def _json_writer(payload) -> Callable:
    data = (json.dumps(payload, indent=2) + "\n").encode("utf-8")
    return lambda file: file.write(data)


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(path.parent)
    atomic_write(path, payload if callable(payload) else _json_writer(payload))


def write_pipeline(folder: str | os.PathLike, spec: PipelineSpec, card: str | None = None) -> list[str]:
    """Write the sentence-transformers files for ``spec`` into ``folder`` (which already holds the Hugging Face
    ``config.json``, weights and tokenizer); returns the module types in order. ``card``: the README.md text.

    The truncating Dense is written as safetensors (``safetensors`` comes with transformers).
    """
    if spec.pooling not in _POOLING_KEY:
        raise ValueError(f"pooling must be one of {tuple(_POOLING_KEY)}, got {spec.pooling!r}")
    if spec.keep_dims is not None and not 1 <= spec.keep_dims <= spec.width:
        raise ValueError(f"keep_dims must be in 1..{spec.width}, got {spec.keep_dims}")
    folder = Path(folder)
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling")]
    _write(folder / "sentence_bert_config.json",
           {"max_seq_length": spec.max_seq_length, "do_lower_case": spec.do_lower_case})
    pooling = {"word_embedding_dimension": spec.width}
    pooling |= {f"pooling_mode_{key}": key == _POOLING_KEY[spec.pooling] for key in POOLING_MODE_KEYS}
    _write(folder / "1_Pooling" / "config.json", pooling)
    if spec.keep_dims is not None and spec.keep_dims < spec.width:
        import torch
        from safetensors.torch import save

        path = f"{len(modules)}_Dense"
        weight = torch.eye(spec.width, dtype=torch.float32)[:spec.keep_dims].contiguous()
        _write(folder / path / "config.json", {"in_features": spec.width, "out_features": spec.keep_dims,
                                               "bias": False,
                                               "activation_function": "torch.nn.modules.linear.Identity"})
        blob = save({"linear.weight": weight})
        _write(folder / path / "model.safetensors", lambda file: file.write(blob))
        modules.append((path, "sentence_transformers.models.Dense"))
    if spec.normalize:
        modules.append((f"{len(modules)}_Normalize", "sentence_transformers.models.Normalize"))
    entries = [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)]
    _write(folder / "modules.json", entries)
    _write(folder / "config_sentence_transformers.json", {"similarity_fn_name": "cosine", "prompts": {},
                                                          "default_prompt_name": None})
    if card is not None:
        _write(folder / "README.md", lambda file: file.write(card.encode("utf-8")))
    return [kind for _, kind in modules]


def format_grid_line(layers: Sequence[int], dims: Sequence[int]) -> str:
    return f"layers {', '.join(map(str, layers))} x dims {', '.join(map(str, dims))}"


def trained_model_card(*, base_model: str, data: str, steps: int, layers: Sequence[int], dims: Sequence[int],
                       pooling: str, max_length: int, normalize: bool, num_layers: int) -> str:
    """README.md of a model ``m2d-train`` saved: what was trained, and how to serve a (layer, dim) pair."""
    deepest, widest = max(layers), max(dims)
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- matryoshka-2d
- m2d-kernels
---

# 2D Matryoshka model trained with m2d-kernels

Base model: `{base_model}`, trained for {steps} steps on `{data}` with the fused 2D Matryoshka
InfoNCE loss of m2d-kernels (`m2d-train`), on the grid of {format_grid_line(layers, dims)}: every
one of those transformer layers, mean-pooled or first-token-pooled as below and cut to its leading
`dim` features, was trained as a sentence embedding.

Pipeline: Transformer ({num_layers} layers, max_seq_length {max_length}, the training's), {pooling}
pooling{", Normalize" if normalize else ""}.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")           # layer {num_layers}, full width
small = SentenceTransformer("path/to/this/folder", truncate_dim={min(dims)})  # leading {min(dims)} features
```

A shallower model (only the first `l` layers, the leading `d` features), loadable the same way:

```bash
m2d-export path/to/this/folder --layer {min(layers)} --dim {min(dims)} exported/
```

The trained grid's deepest layer is {deepest} and its widest dim {widest}; pairs outside the grid
were not trained.
"""
