"""Drop-in fused replacements for sentence-transformers' ``Matryoshka2dLoss`` and ``MatryoshkaLoss``.

Switch by changing one import::

    from m2d_kernels.integrations.sentence_transformers import FusedMatryoshka2dLoss as Matryoshka2dLoss

The loss is sentence-transformers' (v6) ``AdaptiveLayerLoss(MatryoshkaLoss(MultipleNegativesRankingLoss))``::

    total = last_layer_weight * sum_{m in S_final} w_m * mnrl(final layer, d_m)
          + sum_{l in S_layers} layer_weight(l) / |S_layers| * prior_layers_weight
                                * sum_{m in S_l} w_m * mnrl(layer l, d_m)
          + kl_div_weight * T * sum_{l in S_layers} KL(softmax(e_final / T) || softmax(e_l / T))   (batchmean)

where the layer candidates are the hidden states ``0 .. n - 2`` (0 is the embedding output; the final
layer ``n - 1`` is always trained), ``S_*`` are drawn with Python's ``random`` in sentence-transformers'
order (final-layer dims, then the layers, then each layer's dims), and ``e`` are the pooled full-width
embeddings of all columns, the teacher ``e_final`` detached. Instead of one encoder call per (layer,
dim) as sentence-transformers does, each column runs the encoder once with ``output_hidden_states``,
the model's own modules after the transformer (pooling, Dense, Normalize) run on every selected layer,
and one fused :func:`m2d_kernels.matryoshka_2d_infonce` call computes every (layer, dim) pair with an
``[L, M]`` weight matrix.

``mini_batch_size`` turns on gradient caching (GradCache): embed without grad in mini-batches, compute
the fused loss on the full batch, then, in backward, re-embed each mini-batch with grad under the
recorded RNG state and back-propagate the cached embedding gradients.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import RandContext, _create_minibatch, _minibatch_ranges
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.base.model import BaseModel
from sentence_transformers.base.modules import Transformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim
from torch import Tensor, nn

from m2d_kernels.functional import matryoshka_2d_infonce

logger = logging.getLogger(__name__)

LAYER_WEIGHTINGS = ("uniform", "log", "linear")
SUPPORTED_BASE_LOSS = (
    "MultipleNegativesRankingLoss with similarity_fct=cos_sim, no hardness weighting, and directions "
    "('query_to_doc',) or ('query_to_doc', 'doc_to_query') with partition_mode='per_direction'"
)

MATRYOSHKA_CITATION = """
@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""  # noqa: E501 (the author line, verbatim as sentence-transformers cites it)
MATRYOSHKA_2D_CITATION = """
@misc{li20242d,
    title={2D Matryoshka Sentence Embeddings},
    author={Xianming Li and Zongxi Li and Jing Li and Haoran Xie and Qing Li},
    year={2024},
    eprint={2402.14776},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}
"""


@dataclass(frozen=True)
class _Plan:
    """The (layer, dim) selection of one step.

    ``layers`` are hidden-state indices, the final layer (the KL teacher) first; ``weights`` is the
    ``[len(layers), M]`` float64 CPU matrix of pair weights over the ascending unique dims.
    """

    layers: tuple[int, ...]
    weights: Tensor


def _mnrl_settings(loss: nn.Module) -> tuple[float, bool, bool]:
    """``(scale, symmetric, gather_across_devices)`` of a supported base loss, else a ValueError."""
    if not isinstance(loss, MultipleNegativesRankingLoss) or (
        type(loss).compute_loss_from_embeddings is not MultipleNegativesRankingLoss.compute_loss_from_embeddings
    ):
        raise ValueError(f"loss must be a {SUPPORTED_BASE_LOSS}; got {type(loss).__name__}")
    if loss.similarity_fct is not cos_sim:
        name = getattr(loss.similarity_fct, "__name__", type(loss.similarity_fct).__name__)
        raise ValueError(f"loss.similarity_fct must be cos_sim (the fused kernels compute cosines), got {name}")
    if loss.hardness_mode is not None and loss.hardness_strength > 0:
        raise ValueError(
            f"loss.hardness_mode={loss.hardness_mode!r} with hardness_strength > 0 is not supported; "
            f"supported: {SUPPORTED_BASE_LOSS}"
        )
    directions = tuple(loss.directions)
    if directions == ("query_to_doc",):
        symmetric = False
    elif sorted(directions) == ["doc_to_query", "query_to_doc"] and loss.partition_mode == "per_direction":
        symmetric = True
    else:
        raise ValueError(
            f"loss.directions={directions} with partition_mode={loss.partition_mode!r} is not supported; "
            f"supported: {SUPPORTED_BASE_LOSS}"
        )
    return float(loss.scale), symmetric, bool(loss.gather_across_devices)


def _unwrap(model: nn.Module) -> BaseModel:
    """The SentenceTransformer inside DistributedDataParallel / torch.compile wrappers."""
    while not isinstance(model, BaseModel):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"model must be a SentenceTransformer (optionally wrapped), got {type(model).__name__}")
    return model


def _encode_all_layers(transformer: Transformer, features: dict[str, Any]) -> dict[str, Any]:
    """One encoder forward whose output also holds ``all_layer_embeddings`` (as AdaptiveLayerLoss does)."""
    config = transformer.auto_model.config
    original = config.output_hidden_states
    try:
        config.output_hidden_states = True
        return transformer(dict(features))
    finally:
        config.output_hidden_states = original


def _run_head(model: BaseModel, features: dict[str, Any]) -> Tensor:
    """The modules after the transformer (pooling, Dense, Normalize, ...) on one layer's token embeddings."""
    for module in list(model.children())[1:]:
        features = module(features)
    return features["sentence_embedding"]


class _FusedMatryoshkaBase(nn.Module):
    """Shared by the 1D and 2D losses: dims bookkeeping, the fused call, gradient caching."""

    def __init__(self, model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step, mini_batch_size, backend):
        super().__init__()
        self.model = model
        self.loss = loss
        self.scale, self.symmetric, self.gather_across_devices = _mnrl_settings(loss)
        dims = [int(d) for d in matryoshka_dims] if matryoshka_dims is not None else []
        if not dims or any(d <= 0 for d in dims):
            raise ValueError(f"matryoshka_dims must be a non-empty list of positive ints, got {matryoshka_dims!r}")
        if matryoshka_weights is None:
            matryoshka_weights = [1] * len(dims)
        if len(matryoshka_weights) != len(dims):
            raise ValueError(
                f"matryoshka_weights must have one weight per dim ({len(dims)}), got {len(matryoshka_weights)}"
            )
        if any(not math.isfinite(w) or w < 0 for w in matryoshka_weights):
            raise ValueError(f"matryoshka_weights must be finite and non-negative, got {list(matryoshka_weights)}")
        width = _unwrap(model).get_embedding_dimension()
        if width is not None and max(dims) > width:
            raise ValueError(f"matryoshka_dims {dims} cannot exceed the model's embedding dimension {width}")
        if width is not None and width not in dims:
            logger.warning("matryoshka_dims %s do not include the model's embedding dimension %d", dims, width)
        if mini_batch_size is not None and (isinstance(mini_batch_size, bool) or int(mini_batch_size) < 1):
            raise ValueError(f"mini_batch_size must be a positive int or None, got {mini_batch_size!r}")
        # Sorted descending like sentence-transformers, so that random.sample draws the same indices.
        ordered = sorted(zip(dims, matryoshka_weights, strict=True), key=lambda pair: pair[0], reverse=True)
        self.matryoshka_dims = tuple(dim for dim, _ in ordered)
        self.matryoshka_weights = tuple(weight for _, weight in ordered)
        self.n_dims_per_step = n_dims_per_step
        self.mini_batch_size = None if mini_batch_size is None else int(mini_batch_size)
        self.backend = backend
        # The fused call wants strictly increasing dims: repeated dims share one slot, weights add up.
        self._dims = tuple(sorted(set(dims)))
        self._dim_slot = [self._dims.index(d) for d in self.matryoshka_dims]

    # Selection, in sentence-transformers' order of Python ``random`` calls.
    def _sample_dims(self) -> Sequence[int]:
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            return sorted(random.sample(indices, self.n_dims_per_step))
        return indices

    def _dim_weights(self, indices: Iterable[int], factor: float) -> Tensor:
        row = torch.zeros(len(self._dims), dtype=torch.float64)
        for index in indices:
            row[self._dim_slot[index]] += factor * float(self.matryoshka_weights[index])
        return row

    def _plan(self, num_layers: int) -> _Plan:
        raise NotImplementedError

    def _embed_minibatch(self, features: dict[str, Any], plan: _Plan | None) -> tuple[Tensor, _Plan]:
        """``[L, rows, D]`` embeddings of one column (or a slice of it) for the plan's layers."""
        raise NotImplementedError

    def _embed_columns(self, columns: list[dict[str, Any]]) -> tuple[list[Tensor], _Plan]:
        plan, embeddings = None, []
        for features in columns:
            column, plan = self._embed_minibatch(features, plan)
            embeddings.append(column)
        return embeddings, plan

    def _extra_loss(self, embeddings: Tensor) -> Tensor | None:
        """Terms beyond the contrastive pairs, from the ``[L, rows of all columns, D]`` embeddings."""
        return None

    def _loss(self, columns: list[Tensor], plan: _Plan) -> Tensor:
        # Query rows are column 0; the candidates are the positives then every hard-negative column,
        # the same layout as MultipleNegativesRankingLoss's torch.cat(docs).
        extra = {"gather_across_devices": True} if self.gather_across_devices else {}
        loss = matryoshka_2d_infonce(
            columns[0], torch.cat(columns[1:], dim=1), self._dims, plan.weights,
            scale=self.scale, symmetric=self.symmetric, backend=self.backend, **extra,
        )
        kl = self._extra_loss(torch.cat(columns, dim=1))
        return loss if kl is None else loss + kl

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        columns = list(sentence_features)
        if len(columns) < 2:
            raise ValueError(f"sentence_features must hold at least 2 columns (anchor, positive), got {len(columns)}")
        if self.mini_batch_size is None:
            return self._loss(*self._embed_columns(columns))
        return self._forward_cached(columns)

    def _forward_cached(self, columns: list[dict[str, Any]]) -> Tensor:
        grad_enabled = torch.is_grad_enabled()
        ranges = [_minibatch_ranges(features, self.mini_batch_size) for features in columns]
        plan, embeddings, states = None, [], []
        with torch.no_grad():
            for features, column_ranges in zip(columns, ranges, strict=True):
                parts, column_states = [], []
                for begin, end in column_ranges:
                    minibatch = _create_minibatch(features, begin, end)
                    column_states.append(RandContext(*minibatch.values()) if grad_enabled else None)
                    part, plan = self._embed_minibatch(minibatch, plan)
                    parts.append(part)
                embeddings.append(torch.cat(parts, dim=1))
                states.append(column_states)
        if not grad_enabled:
            return self._loss(embeddings, plan)
        leaves = [column.requires_grad_() for column in embeddings]
        loss = self._loss(leaves, plan)
        cached_grads = torch.autograd.grad(loss, leaves)
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(self._replay, columns=columns, ranges=ranges, states=states,
                                   cached_grads=cached_grads, plan=plan))
        return loss

    def _replay(self, grad_output, columns, ranges, states, cached_grads, plan) -> None:
        """Backward hook: re-embed each mini-batch with grad and push the cached gradients through it."""
        with torch.enable_grad():
            replayed = zip(columns, ranges, states, cached_grads, strict=True)
            for features, column_ranges, column_states, grad in replayed:
                for (begin, end), state in zip(column_ranges, column_states, strict=True):
                    with state:
                        part, _ = self._embed_minibatch(_create_minibatch(features, begin, end), plan)
                    part.backward(grad[:, begin:end].to(part.dtype) * grad_output.to(part.dtype))

    def _matryoshka_config(self) -> dict[str, Any]:
        return {
            "loss": type(self.loss).__name__,
            "matryoshka_dims": self.matryoshka_dims,
            "matryoshka_weights": self.matryoshka_weights,
            "n_dims_per_step": self.n_dims_per_step,
            "mini_batch_size": self.mini_batch_size,
            "backend": self.backend,
        }


class FusedMatryoshkaLoss(_FusedMatryoshkaBase):
    """Fused ``MatryoshkaLoss(model, MultipleNegativesRankingLoss, ...)``: all dims in one call.

    Args match sentence-transformers' ``MatryoshkaLoss``; ``loss`` must be a
    ``MultipleNegativesRankingLoss`` (its scale, hard-negative columns, symmetric directions and
    ``gather_across_devices`` are honoured). ``mini_batch_size`` enables gradient caching;
    ``backend`` is passed to :func:`m2d_kernels.matryoshka_2d_infonce`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        n_dims_per_step: int = -1,
        *,
        mini_batch_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step, mini_batch_size, backend)

    def _plan(self, num_layers: int = 1) -> _Plan:
        return _Plan((0,), self._dim_weights(self._sample_dims(), 1.0)[None])

    def _embed_minibatch(self, features, plan):
        return self.model(features)["sentence_embedding"][None], plan or self._plan()

    def _embed_columns(self, columns):
        # The same column merging as MultipleNegativesRankingLoss, so dropout draws the same masks.
        return [column[None] for column in embed_columns(self.model, columns)], self._plan()

    def get_config_dict(self) -> dict[str, Any]:
        return self._matryoshka_config()

    @property
    def citation(self) -> str:
        return MATRYOSHKA_CITATION


class FusedMatryoshka2dLoss(_FusedMatryoshkaBase):
    """Fused ``Matryoshka2dLoss``: every selected (layer, dim) pair in one call, one encoder pass per column.

    Args match sentence-transformers' ``Matryoshka2dLoss`` (see the module docstring for the loss).
    ``loss`` must be a ``MultipleNegativesRankingLoss``. Extra keyword-only args: ``mini_batch_size``
    (gradient caching, for batches whose activations do not fit at once) and ``backend``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        n_layers_per_step: int = 1,
        n_dims_per_step: int = 1,
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        layer_weighting: Literal["uniform", "log", "linear"] | Callable[[int], float] = "uniform",
        *,
        mini_batch_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step, mini_batch_size, backend)
        if not callable(layer_weighting) and layer_weighting not in LAYER_WEIGHTINGS:
            raise ValueError(
                f"layer_weighting must be one of {LAYER_WEIGHTINGS} or a callable, got {layer_weighting!r}"
            )
        for name, value in (("last_layer_weight", last_layer_weight), ("prior_layers_weight", prior_layers_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and non-negative, got {value}")
        if not isinstance(_unwrap(model)[0], Transformer):
            raise TypeError(f"model[0] must be a sentence_transformers Transformer, got {type(_unwrap(model)[0])}")
        self.n_layers_per_step = n_layers_per_step
        self.last_layer_weight = last_layer_weight
        self.prior_layers_weight = prior_layers_weight
        self.kl_div_weight = kl_div_weight
        self.kl_temperature = kl_temperature
        self.layer_weighting = layer_weighting

    def get_layer_weight(self, layer_idx: int) -> float:
        if callable(self.layer_weighting):
            return self.layer_weighting(layer_idx)
        if self.layer_weighting == "log":
            return 1.0 / (1.0 + math.log(1 + layer_idx))
        if self.layer_weighting == "linear":
            return 1.0 / (1 + layer_idx)
        return 1.0

    def _plan(self, num_layers: int) -> _Plan:
        rows = [self._dim_weights(self._sample_dims(), self.last_layer_weight)]
        candidates = range(num_layers - 1)  # hidden state 0 (the embedding output) included
        if 0 < self.n_layers_per_step < len(candidates):
            candidates = random.sample(candidates, self.n_layers_per_step)
        for layer in candidates:
            factor = self.get_layer_weight(layer) / len(candidates) * self.prior_layers_weight
            rows.append(self._dim_weights(self._sample_dims(), factor))
        return _Plan((num_layers - 1, *candidates), torch.stack(rows))

    def _embed_minibatch(self, features, plan):
        model = _unwrap(self.model)
        encoded = _encode_all_layers(model[0], features)
        hidden_states = encoded["all_layer_embeddings"]
        final = len(hidden_states) - 1
        plan = plan or self._plan(len(hidden_states))
        layers = []
        for layer in plan.layers:
            # The final layer takes the regular output path, as the unmodified model would.
            tokens = encoded["token_embeddings"] if layer == final else hidden_states[layer]
            layers.append(_run_head(model, {**encoded, "token_embeddings": tokens}))
        return torch.stack(layers), plan

    def _extra_loss(self, embeddings: Tensor) -> Tensor | None:
        if self.kl_temperature <= 0 or embeddings.shape[0] == 1:
            return None
        # Teacher: the final layer's softmax over feature dims, detached; "batchmean" per prior layer.
        teacher = F.softmax(embeddings[0] / self.kl_temperature, dim=-1).detach()
        students = F.log_softmax(embeddings[1:] / self.kl_temperature, dim=-1)
        kl = F.kl_div(students, teacher.expand_as(students), reduction="sum") / embeddings.shape[1]
        return kl * (self.kl_temperature * self.kl_div_weight)

    def get_config_dict(self) -> dict[str, Any]:
        layer_weighting = self.layer_weighting
        if not isinstance(layer_weighting, str):
            layer_weighting = getattr(layer_weighting, "__name__", "custom")
        return {
            "n_layers_per_step": self.n_layers_per_step,
            "last_layer_weight": self.last_layer_weight,
            "prior_layers_weight": self.prior_layers_weight,
            "kl_div_weight": self.kl_div_weight,
            "kl_temperature": self.kl_temperature,
            "layer_weighting": layer_weighting,
            **self._matryoshka_config(),
        }

    @property
    def citation(self) -> str:
        return MATRYOSHKA_2D_CITATION
