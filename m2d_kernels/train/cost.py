"""What serving a (layer, dim) pair costs, measured on this machine: the cost grid beside the quality grid.

- encode time of the encoder cut to its first ``l`` layers (the model ``m2d-export --layer l``
  serves): milliseconds per 1,000 texts and texts per second, median of ``repeats`` timed passes
  over the same texts after one warm-up pass, tokenisation and pooling included. Every layer is timed
  in the same pass of the full encoder (:func:`time_layers`): the cut encoder runs exactly the ops of
  the full one up to layer ``l``, so its time is the time until layer ``l``'s output, plus pooling;
- bytes per stored vector at each dim: fp32 (4 bytes a feature), int8 (1 byte a feature, plus one
  fp32 scale per vector for symmetric per-vector quantisation), binary (one bit a feature, rounded up
  to whole bytes);
- exact (brute-force) search time at each dim: one matrix product of ``queries`` fp32 vectors
  against a ``corpus``-vector fp32 index and a top-10 per query, median of ``repeats``, in
  milliseconds per 1,000 queries.

The quality of a pair does not depend on its layer's cost and the other way round, so the two grids are
measured apart and joined by :mod:`m2d_kernels.train.pick`.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from m2d_kernels.train import pipeline as pipelines

SEARCH_TOP_K = 10
PRECISION_BYTES = ("fp32", "int8", "binary")


def bytes_per_vector(dim: int) -> dict[str, int]:
    """Storage of one ``dim``-feature vector: ``{"fp32": 4d, "int8": d + 4 (an fp32 scale), "binary": ceil(d/8)}``."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return {"fp32": 4 * dim, "int8": dim + 4, "binary": math.ceil(dim / 8)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encode(pipeline: pipelines.Pipeline, model: torch.nn.Module, tokenizer, texts: Sequence[str],
                batch_size: int = 32, repeats: int = 3) -> float:
    """Median seconds to embed ``texts`` once (tokenise, forward, pool; batches of ``batch_size``), after a
    warm-up pass. The model runs as it is: wrap it in :func:`m2d_kernels.train.pipeline.first_layers` to time a
    shallower encoder."""
    device = next(model.parameters()).device
    times = []
    with torch.no_grad():
        for attempt in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            for begin in range(0, len(texts), batch_size):
                batch = pipelines.tokenize(pipeline, tokenizer, texts[begin:begin + batch_size], device)
                # The last hidden state, as a served model computes it (no output_hidden_states).
                output = model(**batch)
                pipelines.head(pipeline, output.last_hidden_state, batch["attention_mask"])
            _sync(device)
            if attempt:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_layers(pipeline: pipelines.Pipeline, model: torch.nn.Module, tokenizer, texts: Sequence[str],
                batch_size: int = 32, repeats: int = 3) -> list[float]:
    """Median seconds to embed ``texts`` with the encoder cut after each of its layers (element ``l - 1``: the
    first ``l`` layers), from ``repeats`` passes of the full encoder after a warm-up pass: a forward hook on
    each layer reads the clock (after a device sync on CUDA), and each batch's tokenisation and pooling time
    is added to every layer's."""
    device = next(model.parameters()).device
    parent, name = pipelines.layer_stack(model)
    stack = getattr(parent, name)
    stamps: list[float] = []

    def stamp(*_) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    hooks = [layer.register_forward_hook(stamp) for layer in stack]
    passes = []
    try:
        with torch.no_grad():
            for attempt in range(repeats + 1):
                totals = [0.0] * len(stack)
                for begin in range(0, len(texts), batch_size):
                    stamps.clear()
                    _sync(device)
                    start = time.perf_counter()
                    batch = pipelines.tokenize(pipeline, tokenizer, texts[begin:begin + batch_size], device)
                    output = model(**batch)
                    _sync(device)
                    pooling_start = time.perf_counter()
                    pipelines.head(pipeline, output.last_hidden_state, batch["attention_mask"])
                    _sync(device)
                    pooling = time.perf_counter() - pooling_start
                    for index, moment in enumerate(stamps[:len(stack)]):
                        totals[index] += moment - start + pooling
                if attempt:
                    passes.append(totals)
    finally:
        for hook in hooks:
            hook.remove()
    return [statistics.median(run[index] for run in passes) for index in range(len(stack))]


def time_search(dim: int, corpus_size: int, queries: int, device: torch.device, repeats: int = 3,
                seed: int = 0) -> float:
    """Median seconds of an exact top-10 cosine search of ``queries`` unit vectors against ``corpus_size``."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.nn.functional.normalize(torch.randn(corpus_size, dim, generator=generator), dim=-1).to(device)
    probes = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=-1).to(device)
    times = []
    for attempt in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        torch.topk(probes @ index.T, min(SEARCH_TOP_K, corpus_size), dim=-1)
        _sync(device)
        if attempt:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class CostGrid:
    """Measured costs of every layer and dim (the JSON written beside the quality grid).

    ``encode_ms_per_1k_texts[i]``: layer ``layers[i]``; ``search_ms_per_1k_queries[j]`` and
    ``bytes_per_vector[precision][j]``: dim ``dims[j]``.
    """

    layers: list[int]
    dims: list[int]
    encode_ms_per_1k_texts: list[float]
    encode_texts_per_s: list[float]
    bytes_per_vector: dict[str, list[int]]
    search_ms_per_1k_queries: list[float]
    search_corpus_size: int
    search_queries: int
    encode_texts: int
    encode_batch_size: int
    max_seq_length: int
    device: str
    machine: str
    torch_threads: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, payload: dict) -> CostGrid:
        """The grid :meth:`to_json` wrote; ValueError naming the missing fields of anything else."""
        missing = [key for key in cls.__dataclass_fields__ if not isinstance(payload, dict) or key not in payload]
        if missing:
            raise ValueError(f"not a cost grid: no {', '.join(missing)}")
        return cls(**{key: payload[key] for key in cls.__dataclass_fields__})


def machine_description(device: torch.device) -> str:
    """The device as a reader of the numbers needs it: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads"


def measure_costs(model_path: str, layers: Sequence[int], dims: Sequence[int], texts: Sequence[str],
                  device: str | torch.device = "cpu", *, batch_size: int = 32, repeats: int = 3,
                  search_corpus_size: int = 10_000, search_queries: int = 100, model=None, tokenizer=None
                  ) -> CostGrid:
    """The :class:`CostGrid` of a model folder on ``device``: encode time of the encoder cut at each layer of
    ``layers`` over ``texts``, search time over a random ``search_corpus_size`` index at each dim, and bytes
    per vector. ``model`` / ``tokenizer``: an already loaded copy of the folder's (it is not modified)."""
    device = torch.device(device)
    pipeline = pipelines.read_pipeline(model_path)
    for layer in layers:
        pipelines.check_pair(pipeline, layer, max(dims), ("layers", "dims"))
    if not texts:
        raise ValueError("texts must not be empty")
    if model is None:
        _, model, tokenizer = pipelines.load(model_path, device)
    was_training = model.training
    model.eval()
    try:
        per_layer = time_layers(pipeline, model, tokenizer, texts, batch_size, repeats)
    finally:
        model.train(was_training)
    encode = [per_layer[layer - 1] for layer in layers]
    # A search takes milliseconds: more repeats cost little and steady the median.
    search = [time_search(dim, search_corpus_size, search_queries, device, max(repeats, 7)) for dim in dims]
    sizes = [bytes_per_vector(dim) for dim in dims]
    return CostGrid(
        layers=list(layers), dims=list(dims),
        encode_ms_per_1k_texts=[1e6 * seconds / len(texts) for seconds in encode],
        encode_texts_per_s=[len(texts) / seconds for seconds in encode],
        bytes_per_vector={precision: [size[precision] for size in sizes] for precision in PRECISION_BYTES},
        search_ms_per_1k_queries=[1e6 * seconds / search_queries for seconds in search],
        search_corpus_size=search_corpus_size, search_queries=search_queries, encode_texts=len(texts),
        encode_batch_size=batch_size, max_seq_length=pipeline.max_seq_length, device=str(device),
        machine=machine_description(device), torch_threads=torch.get_num_threads(),
    )


def format_costs(costs: CostGrid) -> str:
    """Two small tables: per layer (encode) and per dim (bytes, search)."""
    lines = [f"cost grid on {costs.device} ({costs.machine}); encode: {costs.encode_texts} texts, batch "
             f"{costs.encode_batch_size}, max {costs.max_seq_length} tokens; search: exact top-{SEARCH_TOP_K} over "
             f"{costs.search_corpus_size} vectors", "layer  ms/1k texts  texts/s"]
    for layer, ms, rate in zip(costs.layers, costs.encode_ms_per_1k_texts, costs.encode_texts_per_s, strict=True):
        lines.append(f"{layer:>5}  {ms:>11.1f}  {rate:>7.0f}")
    lines.append("  dim  fp32 B  int8 B  binary B  search ms/1k queries")
    for j, dim in enumerate(costs.dims):
        sizes = [costs.bytes_per_vector[p][j] for p in PRECISION_BYTES]
        search = costs.search_ms_per_1k_queries[j]
        lines.append(f"{dim:>5}  {sizes[0]:>6}  {sizes[1]:>6}  {sizes[2]:>8}  {search:>20.2f}")
    return "\n".join(lines)
