"""A sentence-transformers evaluator of every (layer, dim) pair of a 2D Matryoshka model.

sentence-transformers' evaluators score one embedding per text: the model's last layer at one width.
:class:`Matryoshka2dEvaluator` embeds each text once with ``output_hidden_states`` and runs the model's
own modules after the transformer (pooling, Dense, Normalize) on every selected layer, as the fused
adapters do in training, then scores each leading ``dim`` of each layer:

- STS (``sentences1``, ``sentences2``, ``scores``): Spearman correlation of the truncated cosine with
  the gold scores, ``layer{l}_dim{d}_spearman``;
- retrieval (``queries``, ``corpus``, ``relevant_docs``, as sentence-transformers'
  ``InformationRetrievalEvaluator`` takes them): ``layer{l}_dim{d}_ndcg@10``, ``..._mrr@10`` and
  ``..._recall@{k}`` for each ``k`` of ``recall_at`` (binary relevance, cosine similarity; ties count
  against the query).

Values are fractions (sentence-transformers' convention). The returned dict also holds the primary
metric (``primary_metric``, which ``SentenceTransformerTrainer`` logs and, with
``metric_for_best_model``, selects checkpoints by); ``primary`` chooses it:

- ``"mean"`` (default): the main metric (``spearman`` for STS, else ``ndcg@10``) averaged over the grid;
- ``"full"``: the main metric of the deepest layer at the widest dim;
- ``(layer, dim)``: that pair's main metric;
- ``"smallest_within:P"``: the main metric of the smallest pair (fewest layers, then fewest dims)
  whose main metric is within ``P`` points (x 100) of the full pair's; its layer and dim are reported
  as ``smallest_within_layer`` / ``smallest_within_dim``.

The scoring is :mod:`m2d_kernels.train.evaluate`'s, which ``m2d-train``'s grids use too.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator
from torch import Tensor

from m2d_kernels.integrations.sentence_transformers import _run_head, _unwrap
from m2d_kernels.train import evaluate

MAIN_METRIC = {"sts": "spearman", "retrieval": "ndcg@10"}


def pair_key(layer: int, dim: int, metric: str) -> str:
    """The flat key of one (layer, dim) metric: ``layer{layer}_dim{dim}_{metric}``."""
    return f"layer{layer}_dim{dim}_{metric}"


def _check_primary(primary) -> None:
    if primary in ("mean", "full"):
        return
    if isinstance(primary, str) and primary.startswith("smallest_within:"):
        try:
            points = float(primary.split(":", 1)[1])
        except ValueError:
            points = -1.0
        if points >= 0:
            return
    if isinstance(primary, tuple | list) and len(primary) == 2 and all(isinstance(v, int) for v in primary):
        return
    raise ValueError(f"primary must be 'mean', 'full', 'smallest_within:POINTS' (POINTS >= 0) or a (layer, dim) "
                     f"pair, got {primary!r}")


class Matryoshka2dEvaluator(SentenceEvaluator):
    """Scores every (layer, dim) pair of a sentence-transformers model (module docstring).

    Args:
        layers: hidden-state indices to score (1..number of layers; 0 is the embedding output).
            None: every transformer layer.
        dims: strictly increasing leading dims. None: 32, 64, ... below the model's width, then the width.
        sentences1, sentences2, scores: an STS set (scored pairs).
        queries, corpus, relevant_docs: a retrieval set (id -> text, id -> text, query id -> relevant ids).
        primary: which value is ``primary_metric`` (module docstring).
        recall_at: the k of ``recall@k``; ``ndcg_at`` / ``mrr_at``: their cutoffs (10).
        batch_size: texts per forward. name: prefix of every key (sentence-transformers' convention).
        write_csv: when called with an ``output_path``, append the flat metrics to
            ``matryoshka_2d_results.csv`` there (one row per call, as sentence-transformers' evaluators do) and
            write the grid as ``matryoshka_2d_grid.json``, both atomically and prefixed ``<name>_`` when named.
    """

    def __init__(
        self,
        *,
        layers: Sequence[int] | None = None,
        dims: Sequence[int] | None = None,
        sentences1: Sequence[str] | None = None,
        sentences2: Sequence[str] | None = None,
        scores: Sequence[float] | None = None,
        queries: Mapping[str, str] | None = None,
        corpus: Mapping[str, str] | None = None,
        relevant_docs: Mapping[str, set[str] | Sequence[str]] | None = None,
        primary: str | tuple[int, int] = "mean",
        recall_at: Sequence[int] = (1, 10),
        ndcg_at: int = 10,
        mrr_at: int = 10,
        batch_size: int = 32,
        name: str = "",
        write_csv: bool = True,
    ) -> None:
        super().__init__()
        sts = (sentences1, sentences2, scores)
        retrieval = (queries, corpus, relevant_docs)
        if any(v is not None for v in sts) and not all(v is not None for v in sts):
            raise ValueError("sentences1, sentences2 and scores come together (an STS set)")
        if any(v is not None for v in retrieval) and not all(v is not None for v in retrieval):
            raise ValueError("queries, corpus and relevant_docs come together (a retrieval set)")
        if sentences1 is None and queries is None:
            raise ValueError("give an STS set (sentences1, sentences2, scores) or a retrieval set "
                             "(queries, corpus, relevant_docs)")
        if sentences1 is not None and queries is not None:
            raise ValueError("give one set per evaluator (combine several with SequentialEvaluator)")
        _check_primary(primary)
        for label, values in (("recall_at", list(recall_at)), ("ndcg_at", [ndcg_at]), ("mrr_at", [mrr_at]),
                              ("batch_size", [batch_size])):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{label} must be positive ints, got {values}")
        self.kind = "sts" if sentences1 is not None else "retrieval"
        if self.kind == "sts":
            if not len(sentences1) == len(sentences2) == len(scores) or len(scores) < 2:
                raise ValueError(f"sentences1, sentences2 and scores must have one length >= 2, got "
                                 f"{len(sentences1)}, {len(sentences2)}, {len(scores)}")
            self.sentences1, self.sentences2 = list(sentences1), list(sentences2)
            self.scores = [float(s) for s in scores]
        else:
            self._set_retrieval(queries, corpus, relevant_docs)
        self.layers = None if layers is None else tuple(layers)
        self.dims = None if dims is None else tuple(dims)
        self.primary = tuple(primary) if isinstance(primary, list) else primary
        self.recall_at, self.ndcg_at, self.mrr_at = tuple(recall_at), ndcg_at, mrr_at
        self.batch_size, self.name, self.write_csv = batch_size, name, write_csv
        self.main_metric = MAIN_METRIC[self.kind] if self.kind == "sts" else f"ndcg@{ndcg_at}"
        self.primary_metric = self._primary_key()

    def _set_retrieval(self, queries, corpus, relevant_docs) -> None:
        query_ids = [qid for qid in queries if relevant_docs.get(qid)]
        if not query_ids:
            raise ValueError("no query has a relevant document in relevant_docs")
        corpus_ids = list(corpus)
        position = {cid: i for i, cid in enumerate(corpus_ids)}
        relevant = torch.zeros(len(query_ids), len(corpus_ids), dtype=torch.bool)
        for row, qid in enumerate(query_ids):
            for cid in relevant_docs[qid]:
                if cid not in position:
                    raise ValueError(f"relevant_docs[{qid!r}] names {cid!r}, which is not in the corpus")
                relevant[row, position[cid]] = True
        self.query_ids, self.corpus_ids = query_ids, corpus_ids
        self.query_texts = [queries[qid] for qid in query_ids]
        self.corpus_texts = [corpus[cid] for cid in corpus_ids]
        self.relevant = relevant

    def _primary_key(self) -> str:
        if self.primary == "mean":
            return f"mean_{self.main_metric}"
        if self.primary == "full":
            return f"full_{self.main_metric}"
        if isinstance(self.primary, tuple):
            return pair_key(*self.primary, self.main_metric)
        return f"smallest_within_{self.main_metric}"

    # ------------------------------------------------------------------ embedding

    def embed(self, model, texts: Sequence[str], layers: Sequence[int]) -> Tensor:
        """``[len(layers), len(texts), width]`` float32 CPU embeddings: one forward per batch with
        ``output_hidden_states``, the model's modules after the transformer run on each layer's tokens."""
        inner = _unwrap(model, type(self).__name__)
        transformer_config = inner[0].auto_model.config
        was_training, original = inner.training, transformer_config.output_hidden_states
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding, as encode() does
        chunks = []
        try:
            inner.eval()
            transformer_config.output_hidden_states = True
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    batch = [texts[i] for i in order[start:start + self.batch_size]]
                    features = inner.preprocess(batch)
                    features = {k: v.to(inner.device) if isinstance(v, Tensor) else v for k, v in features.items()}
                    output = inner(features)
                    hidden = output["all_layer_embeddings"]
                    final = len(hidden) - 1
                    head_input = {k: v for k, v in output.items() if k != "sentence_embedding"}
                    per_layer = [output["sentence_embedding"] if layer == final
                                 else _run_head(inner, {**head_input, "token_embeddings": hidden[layer]})
                                 for layer in layers]
                    chunks.append(torch.stack(per_layer).float().cpu())
        finally:
            transformer_config.output_hidden_states = original
            inner.train(was_training)
        embeddings = torch.cat(chunks, dim=1)
        restored = torch.empty_like(embeddings)
        restored[:, order] = embeddings
        return restored

    def _grid_axes(self, model) -> tuple[tuple[int, ...], tuple[int, ...]]:
        from m2d_kernels.train.encoder import check_layers_and_dims
        from m2d_kernels.train.loop import default_dims

        inner = _unwrap(model, type(self).__name__)
        num_layers = inner[0].auto_model.config.num_hidden_layers
        # Renamed in sentence-transformers 6.1 (the old name warns there).
        width = (getattr(inner, "get_embedding_dimension", None) or inner.get_sentence_embedding_dimension)()
        layers = self.layers or tuple(range(1, num_layers + 1))
        dims = self.dims or default_dims(width)
        check_layers_and_dims(layers, dims, num_layers, width)
        if isinstance(self.primary, tuple) and (self.primary[0] not in layers or self.primary[1] not in dims):
            raise ValueError(f"primary pair {self.primary} is not in the grid of layers {list(layers)} x dims "
                             f"{list(dims)}")
        return layers, dims

    # ------------------------------------------------------------------ scoring

    def grid(self, model) -> dict[str, Any]:
        """``{"layers", "dims", "metrics": {metric: [[value per dim] per layer]}}`` (fractions)."""
        layers, dims = self._grid_axes(model)
        if self.kind == "sts":
            first = self.embed(model, self.sentences1, layers)
            second = self.embed(model, self.sentences2, layers)
            gold = torch.tensor(self.scores, dtype=torch.float64)
            metrics = {"spearman": evaluate.sts_spearman_grid(first, second, gold, dims)}
        else:
            queries = self.embed(model, self.query_texts, layers)
            corpus = self.embed(model, self.corpus_texts, layers)
            metrics = evaluate.retrieval_grid_scores(queries, corpus, self.relevant, dims, ndcg_at=self.ndcg_at,
                                                     mrr_at=self.mrr_at, recall_at=self.recall_at)
        return {"layers": list(layers), "dims": list(dims), "metrics": metrics}

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        result = self.grid(model)
        layers, dims = result["layers"], result["dims"]
        flat: dict[str, float] = {}
        for metric, grid in result["metrics"].items():
            for i, layer in enumerate(layers):
                for j, dim in enumerate(dims):
                    flat[pair_key(layer, dim, metric)] = grid[i][j]
        main = result["metrics"][self.main_metric]
        flat[f"mean_{self.main_metric}"] = sum(map(sum, main)) / (len(layers) * len(dims))
        full = main[layers.index(max(layers))][len(dims) - 1]
        flat[f"full_{self.main_metric}"] = full
        if isinstance(self.primary, str) and self.primary.startswith("smallest_within:"):
            points = float(self.primary.split(":", 1)[1]) / 100
            # Fewest layers first (the encoder's cost), then fewest dims (the index's); the full pair qualifies.
            for layer in sorted(layers):
                row = main[layers.index(layer)]
                candidates = [j for j in range(len(dims)) if row[j] >= full - points]
                if candidates:
                    flat["smallest_within_layer"], flat["smallest_within_dim"] = layer, dims[candidates[0]]
                    flat[f"smallest_within_{self.main_metric}"] = row[candidates[0]]
                    break
        if output_path is not None and self.write_csv:
            self._write(Path(output_path), result, flat, epoch, steps)
        metrics = self.prefix_name_to_metrics(flat, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    def _write(self, folder: Path, result: dict, flat: dict[str, float], epoch: int, steps: int) -> None:
        from m2d_kernels.train.atomic import atomic_write

        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"{self.name}_" if self.name else ""
        payload = json.dumps({**result, "epoch": epoch, "steps": steps}, indent=2).encode("utf-8")
        atomic_write(folder / f"{prefix}matryoshka_2d_grid.json", lambda file: file.write(payload))
        results = folder / f"{prefix}matryoshka_2d_results.csv"
        # One row per call, as sentence-transformers' evaluators append; the file is rewritten whole (atomically),
        # so a crash mid-write never leaves half a row.
        previous = results.read_text(encoding="utf-8") if results.is_file() else ""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not previous:
            writer.writerow(["epoch", "steps", *flat])
        writer.writerow([epoch, steps, *flat.values()])
        data = (previous + buffer.getvalue()).encode("utf-8")
        atomic_write(results, lambda file: file.write(data))

    def get_config_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "dims": self.dims, "primary": self.primary, "kind": self.kind}
