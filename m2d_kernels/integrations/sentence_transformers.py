"""Fused drop-in replacements for sentence-transformers' Matryoshka2dLoss, MatryoshkaLoss and AdaptiveLayerLoss.

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

The encoder always runs through ``loss.model``, the object sentence-transformers' trainer places there
(DDP, torch.compile), so DDP synchronises the gradients.

Fused base losses (``SUPPORTED_BASE_LOSS``), each mapped to one fused call with its own options:

- ``MultipleNegativesRankingLoss`` and ``MultipleNegativesSymmetricRankingLoss``: ``scale``, ``directions``,
  ``partition_mode``, ``hardness_mode`` / ``hardness_strength``, ``similarity_fct`` ``cos_sim`` or
  ``dot_score``, ``gather_across_devices``, hard-negative columns. sentence-transformers' Matryoshka losses
  re-normalise every truncated embedding, so there ``dot_score`` is the cosine; only
  :class:`FusedAdaptiveLayerLoss` (no truncation) computes plain dot products.
- ``CachedMultipleNegativesRankingLoss`` and ``CachedMultipleNegativesSymmetricRankingLoss``: the same
  options; their ``mini_batch_size`` and ``mini_batch_num_tokens`` become this loss's gradient caching.
- ``GISTEmbedLoss`` and ``CachedGISTEmbedLoss``: the guide model embeds every column once per step without
  grad (re-tokenised as GIST does when the tokenizers differ), and the fused call drops the candidates the
  guide scores above the positive (``margin``, ``margin_strategy``); ``contrast_anchors`` and
  ``contrast_positives`` add GIST's anchor-anchor and positive-positive blocks to one joint softmax;
  ``temperature`` is ``1 / scale``. The guide runs once per step, where sentence-transformers re-runs it
  for every (layer, dim) pair: the same in eval mode, the way a guide is used.

An option of these classes the kernels cannot express (a custom ``similarity_fct``, ...) is a ValueError
naming it. Other base losses, and negative or non-finite weights, run sentence-transformers' own loss
instead, with one warning.

``mini_batch_size`` (or a cached base loss's) turns on gradient caching (GradCache): embed without grad
in mini-batches, compute the fused loss on the full batch, then, in backward, re-embed each mini-batch
with grad under the recorded RNG state and back-propagate the cached embedding gradients.

``log_pair_losses=True`` (fused path) makes ``forward`` return a dict instead of a tensor, which
sentence-transformers' trainer sums for backward and logs entry by entry: ``layer{l}_dim{d}`` (2D),
``dim{d}`` (MatryoshkaLoss) or ``layer{l}`` (AdaptiveLayerLoss), the weighted loss of that pair, for
every hidden state ``l`` up to the final one and every dim (0 for the pairs a step did not draw, so the
keys stay the same), plus ``kl``. The entries sum to the loss, in value and gradient. The fused call
computes the ``[L, M]`` pair matrix in any case, so this costs no extra kernel and no host sync.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import sentence_transformers
import torch
import torch.nn.functional as F
from packaging.version import Version
from sentence_transformers.base.losses.gradcache import RandContext, _create_minibatch, _minibatch_ranges
from sentence_transformers.base.losses.merged_forward import column_merging_disabled, embed_columns
from sentence_transformers.base.model import BaseModel
from sentence_transformers.sentence_transformer.losses import (
    AdaptiveLayerLoss,
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
    GISTEmbedLoss,
    Matryoshka2dLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import cos_sim, dot_score
from torch import Tensor, nn

from m2d_kernels.functional import matryoshka_2d_infonce

logger = logging.getLogger(__name__)

# The one place the adapters follow the installed release. sentence-transformers 6.3 made GIST's
# anchor-anchor and positive-positive blocks drop the row itself whatever the guide says; 6.0-6.2 left it
# to the guide. The parity tests (tests/test_objective.py, tests/test_integrations_st*.py) read it too, and
# CI runs them against the newest release and against 6.0.1 (.ci/run).
GIST_EXCLUDES_SELF = Version(sentence_transformers.__version__).release >= (6, 3)

SUPPORTED_BASE_LOSS = (
    "MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss, CachedMultipleNegativesRankingLoss, "
    "CachedMultipleNegativesSymmetricRankingLoss (similarity_fct cos_sim or dot_score, any directions, "
    "partition_mode, hardness_mode), GISTEmbedLoss and CachedGISTEmbedLoss"
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


# The methods that define each fused base loss's computation: a subclass overriding one is another loss.
_FUSED_CLASSES = {
    MultipleNegativesRankingLoss: ("forward", "compute_loss_from_embeddings"),
    CachedMultipleNegativesRankingLoss: ("forward", "forward_cached", "calculate_loss", "embed_minibatch"),
    GISTEmbedLoss: ("forward", "sim_matrix"),
    CachedGISTEmbedLoss: ("forward", "calculate_loss", "embed_minibatch", "sim_matrix"),
}


def _fused_class(loss: nn.Module) -> type | None:
    """The fused base-loss class ``loss`` is an instance of (its computation unchanged), or None."""
    for cls, methods in _FUSED_CLASSES.items():
        if isinstance(loss, cls) and all(getattr(type(loss), m) is getattr(cls, m) for m in methods):
            return cls
    return None


@dataclass(frozen=True)
class _BaseLossOptions:
    """What one fused call takes from the base loss (:func:`_base_loss_options`)."""

    scale: float
    gather_across_devices: bool
    options: dict[str, Any]  # keyword arguments of matryoshka_2d_infonce beyond scale and gather
    guide: nn.Module | None = None  # GIST's guide model
    mini_batch_size: int | None = None  # a cached base loss's gradient caching
    mini_batch_num_tokens: int | None = None


def _base_loss_options(loss: nn.Module, cls: type, renormalises: bool) -> _BaseLossOptions:
    """Map a fused base loss to the options of :func:`matryoshka_2d_infonce`.

    ``renormalises``: the wrapper truncates and re-normalises every embedding (sentence-transformers'
    Matryoshka losses), so ``dot_score`` is the cosine there. Raises ValueError naming an option the
    kernels cannot express.
    """
    name = type(loss).__name__
    cached = {"mini_batch_size": None, "mini_batch_num_tokens": None}
    if cls in (CachedMultipleNegativesRankingLoss, CachedGISTEmbedLoss):
        cached = {"mini_batch_size": int(loss.mini_batch_size), "mini_batch_num_tokens": loss.mini_batch_num_tokens}
    gather = bool(loss.gather_across_devices)
    if cls in (GISTEmbedLoss, CachedGISTEmbedLoss):
        similarity = loss.similarity_fct
        if not isinstance(similarity, nn.CosineSimilarity) or similarity.dim not in (-1, 1):
            raise ValueError(f"{name}(similarity_fct={similarity!r}) is not fused: the kernels compute "
                             "GIST's nn.CosineSimilarity(dim=-1)")
        temperature = float(loss.temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{name}(temperature={loss.temperature!r}): the fused loss needs a finite positive "
                             "temperature (its scale is 1 / temperature)")
        directions = ("query_to_doc",) + ("query_to_query",) * bool(loss.contrast_anchors) \
            + ("doc_to_doc",) * bool(loss.contrast_positives)
        options = dict(directions=directions, partition_mode="joint", guide_margin=float(loss.margin),
                       guide_margin_strategy=loss.margin_strategy, guide_exclude_self=GIST_EXCLUDES_SELF)
        return _BaseLossOptions(1.0 / temperature, gather, options, guide=loss.guide, **cached)
    if loss.similarity_fct is cos_sim or (loss.similarity_fct is dot_score and renormalises):
        similarity = "cos"
    elif loss.similarity_fct is dot_score:
        similarity = "dot"
    else:
        function = getattr(loss.similarity_fct, "__name__", type(loss.similarity_fct).__name__)
        raise ValueError(f"{name}(similarity_fct={function}) is not fused: the kernels compute "
                         "sentence_transformers.util.cos_sim or dot_score")
    hardness = loss.hardness_mode is not None and loss.hardness_strength > 0
    # A repeated direction is one similarity block in sentence-transformers (a dict key).
    options = dict(directions=tuple(dict.fromkeys(loss.directions)), partition_mode=loss.partition_mode,
                   similarity=similarity, hardness_mode=loss.hardness_mode if hardness else None,
                   hardness_strength=float(loss.hardness_strength) if hardness else 0.0)
    return _BaseLossOptions(float(loss.scale), gather, options, **cached)


def _weights_reason(**weights: Any) -> str | None:
    """The kernels take finite non-negative pair weights; name the arguments that are not."""
    bad = []
    for name, values in weights.items():
        try:
            values = [] if values is None else values if isinstance(values, Iterable) else [values]
            values = [float(v) for v in values]
            if any(not math.isfinite(v) or v < 0 for v in values):
                bad.append(name)
        except (TypeError, ValueError):
            bad.append(name)
    return f"negative or non-finite {', '.join(bad)}" if bad else None


def _unwrap(model: nn.Module, owner: str) -> BaseModel:
    """The model inside DistributedDataParallel / torch.compile wrappers (sentence-transformers' error text)."""
    inner = model
    while not isinstance(inner, BaseModel):
        if hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        elif hasattr(inner, "module"):
            inner = inner.module
        else:
            raise TypeError(
                f"{owner} could not unwrap {type(model).__name__} to a BaseModel "
                f"(stopped at {type(inner).__name__}). "
                "Expected DistributedDataParallel, torch.compile's OptimizedModule, or a BaseModel."
            )
    return inner


def _run_head(model: BaseModel, features: dict[str, Any]) -> Tensor:
    """The modules after the transformer (pooling, Dense, Normalize, ...) on one layer's token embeddings."""
    for module in list(model.children())[1:]:
        features = module(features)
    return features["sentence_embedding"]


class _FusedMatryoshkaBase(nn.Module):
    """Shared by the losses: the fused or unfused choice, dims bookkeeping, the fused call, gradient caching.

    ``unfused`` is sentence-transformers' own loss built from the same arguments. Building it first gives
    exactly its validation (exception types, messages, the dims warning). When the kernels cover the
    arguments it is dropped; otherwise it stays a child module (so the trainer's ``override_model_in_loss``
    reaches its ``model``) and ``forward`` runs it, warning once which argument was not fused.
    """

    _st_class: type[nn.Module]
    # Whether sentence-transformers' loss truncates and re-normalises every embedding (MatryoshkaLoss),
    # and whether it embeds the columns in one merged forward (AdaptiveLayerLoss disables merging).
    _renormalises = True
    _merges_columns = True
    # Return the per-pair components as a dict (sentence-transformers' trainer logs each entry): set by the
    # subclasses' ``log_pair_losses`` argument.
    log_pair_losses = False

    def __init__(self, model, loss, st_args: dict[str, Any], weights: dict[str, Any], mini_batch_size, backend):
        super().__init__()
        cls = _fused_class(loss)
        reason = (None if cls is not None else f"the base loss {type(loss).__name__} (only {SUPPORTED_BASE_LOSS} "
                  "are fused)") or _weights_reason(**weights)
        own_calculate_loss = vars(loss).get("calculate_loss")
        with warnings.catch_warnings():
            if reason is None:  # AdaptiveLayerLoss warns it cannot use a cached base loss; the fused loss can
                warnings.filterwarnings("ignore", message="AdaptiveLayerLoss is not compatible", category=UserWarning)
            unfused = self._st_class(model, loss, **st_args)  # sentence-transformers' validation, verbatim
        if "n_dims_per_step" in st_args:
            check_per_step("n_dims_per_step", st_args["n_dims_per_step"], len(st_args["matryoshka_dims"]),
                           "matryoshka_dims")
        if mini_batch_size is not None and (isinstance(mini_batch_size, bool) or int(mini_batch_size) < 1):
            raise ValueError(f"mini_batch_size must be a positive int or None, got {mini_batch_size!r}")
        self.model = model
        self.loss = loss
        self.mini_batch_size = None if mini_batch_size is None else int(mini_batch_size)
        self.mini_batch_num_tokens = None
        self.backend = backend
        self.unfused_reason = reason
        self._warned = False
        matryoshka = getattr(unfused, "loss", None) if not hasattr(unfused, "matryoshka_dims") else unfused
        # Sorted descending by sentence-transformers, so that random.sample draws the same indices.
        self.matryoshka_dims = tuple(getattr(matryoshka, "matryoshka_dims", ()))
        self.matryoshka_weights = tuple(getattr(matryoshka, "matryoshka_weights", ()))
        self.n_dims_per_step = getattr(matryoshka, "n_dims_per_step", -1)
        if reason is not None:
            self.unfused = unfused
            return
        self.unfused = None
        # MatryoshkaLoss replaced a cached base loss's calculate_loss by its decorator: undo it, the
        # fused loss never calls it and the caller's base loss must stay as it was.
        if own_calculate_loss is None:
            vars(loss).pop("calculate_loss", None)
        else:
            loss.calculate_loss = own_calculate_loss
        base = _base_loss_options(loss, cls, self._renormalises)
        if base.mini_batch_size is not None:
            if self.mini_batch_size is not None and self.mini_batch_size != base.mini_batch_size:
                raise ValueError(f"mini_batch_size={self.mini_batch_size} disagrees with the base loss "
                                 f"{type(loss).__name__}(mini_batch_size={base.mini_batch_size}); give it once")
            self.mini_batch_size = base.mini_batch_size
            self.mini_batch_num_tokens = base.mini_batch_num_tokens
        self.scale, self.gather_across_devices = base.scale, base.gather_across_devices
        self._options = base.options
        self._guided = base.guide is not None
        self._max_columns = 3 if cls is GISTEmbedLoss else None  # GISTEmbedLoss takes one negative column
        # The fused call wants strictly increasing dims: repeated dims share one slot, weights add up.
        # No dims (AdaptiveLayerLoss): one slot, the full embedding width seen in forward.
        self._dims = tuple(sorted(set(self.matryoshka_dims))) or None
        self._dim_slot = [self._dims.index(d) for d in self.matryoshka_dims] if self._dims else [0]
        self._slot_weights = self.matryoshka_weights or (1,)

    # Selection, in sentence-transformers' order of Python ``random`` calls.
    def _sample_dims(self) -> Sequence[int]:
        indices = range(len(self._slot_weights))
        if 0 < self.n_dims_per_step < len(indices):
            return sorted(random.sample(indices, self.n_dims_per_step))
        return indices

    def _dim_weights(self, indices: Iterable[int], factor: float) -> Tensor:
        row = torch.zeros(len(self._dims or (0,)), dtype=torch.float64)
        for index in indices:
            row[self._dim_slot[index]] += factor * float(self._slot_weights[index])
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

    def _embed_guide(self, columns: list[dict[str, Any]]) -> list[Tensor]:
        """GIST's guide embeddings of ``columns`` (or of one mini-batch), without grad, as GIST computes them."""
        gist = self.loss
        with torch.no_grad():
            if gist.must_retokenize:  # decode the model's tokens, re-tokenise with the guide's tokenizer
                device = gist.guide.device
                columns = [gist.guide.preprocess(gist.tokenizer.batch_decode(f["input_ids"], skip_special_tokens=True))
                           for f in columns]
                columns = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in f.items()} for f in columns]
            if self._merges_columns:
                return embed_columns(gist.guide, columns)
            with column_merging_disabled():  # AdaptiveLayerLoss embeds every column on its own
                return embed_columns(gist.guide, columns)

    def _loss(self, columns: list[Tensor], plan: _Plan, guide: list[Tensor] | None = None) -> Tensor:
        return self._loss_parts(columns, plan, guide)[0]

    def _loss_parts(self, columns: list[Tensor], plan: _Plan, guide: list[Tensor] | None = None
                    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(total, weighted ``[len(plan.layers), M]`` pair losses or None, the extra term or None). The pair
        matrix is what the fused call computes anyway (``reduction="none"``): the total is its weighted sum,
        exactly as ``reduction="sum"`` forms it, so asking for the parts costs no extra kernel."""
        # Query rows are column 0; the candidates are the positives then every hard-negative column,
        # the same layout as MultipleNegativesRankingLoss's torch.cat(docs) (and GIST's blocks).
        extra = {"gather_across_devices": True} if self.gather_across_devices else {}
        if guide is not None:
            device = columns[0].device
            extra["guide"] = (guide[0].to(device), torch.cat(guide[1:]).to(device))
        parts = self.log_pair_losses
        loss = matryoshka_2d_infonce(
            columns[0], torch.cat(columns[1:], dim=1), self._dims or (columns[0].shape[-1],), plan.weights,
            scale=self.scale, backend=self.backend, reduction="none" if parts else "sum", **self._options, **extra,
        )
        pairs = None
        if parts:
            pairs = loss * plan.weights.to(device=loss.device, dtype=loss.dtype)
            loss = pairs.sum()
        kl = self._extra_loss(torch.cat(columns, dim=1))
        return (loss if kl is None else loss + kl), pairs, kl

    def _parts(self, columns: list[Tensor], plan: _Plan, guide: list[Tensor] | None):
        """:meth:`_loss_parts` when the components are logged, else (:meth:`_loss`, None, None): a subclass
        with its own ``_loss`` (Starbucks) keeps it."""
        if self.log_pair_losses:
            return self._loss_parts(columns, plan, guide)
        return self._loss(columns, plan, guide), None, None

    def _pair_keys(self, plan: _Plan) -> list[str]:
        """Names of the logged components: every hidden state up to the final one (``layer{l}``) times every dim
        (``dim{d}``), the same keys every step (0 for the pairs a step did not draw)."""
        dims = [f"dim{d}" for d in self._dims] if self._dims else [""]
        layers = [""] if len(plan.layers) == 1 and plan.layers[0] == 0 else \
            [f"layer{layer}" for layer in range(max(plan.layers) + 1)]
        return ["_".join(part for part in (layer, dim) if part) for layer in layers for dim in dims]

    def _as_components(self, total: Tensor, pairs: Tensor, kl: Tensor | None, plan: _Plan) -> dict[str, Tensor]:
        """``{"layer{l}_dim{d}": weighted pair loss, ..., "kl": the KL term}``, summing to ``total`` in value and
        gradient: every entry is detached except one, the largest, which carries ``total`` minus the others
        (its value equals its own component up to rounding). Device ops only: no host sync."""
        keys = self._pair_keys(plan)
        rows = max(plan.layers) + 1 if keys[0].startswith("layer") else 1
        full = torch.zeros(rows, pairs.shape[1], dtype=pairs.dtype, device=pairs.device)
        full[list(plan.layers) if rows > 1 else [0]] = pairs.detach()
        values = full.flatten()
        if kl is not None:
            values = torch.cat([values, kl.detach().reshape(1).to(values.dtype)])
            keys = [*keys, "kl"]
        carrier = F.one_hot(torch.argmax(values), len(values)).to(values.dtype)
        others = values * (1 - carrier)
        values = others + carrier * (total.to(values.dtype) - others.sum())
        return dict(zip(keys, values.unbind(), strict=True))

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if self.unfused is not None:
            if not self._warned:
                self._warned = True
                ignored = "; mini_batch_size is ignored" if self.mini_batch_size is not None else ""
                warnings.warn(
                    f"{type(self).__name__}: {self.unfused_reason} is not fused; running sentence-transformers' "
                    f"{self._st_class.__name__} instead{ignored}", UserWarning, stacklevel=2,
                )
            return self.unfused(sentence_features, labels)
        columns = list(sentence_features)
        if len(columns) < 2:
            raise ValueError(f"sentence_features must hold at least 2 columns (anchor, positive), got {len(columns)}")
        if self._max_columns is not None and len(columns) > self._max_columns:
            raise ValueError(f"{type(self.loss).__name__} expects 2 or 3 columns (anchor, positive, optional "
                             f"negative), got {len(columns)} sentence_features")
        if self.mini_batch_size is not None:
            return self._forward_cached(columns)
        # GIST copies the features before the model runs (modules may change them in place).
        guide_columns = [dict(features) for features in columns] if self._guided else None
        embeddings, plan = self._embed_columns(columns)
        guide = None if guide_columns is None else self._embed_guide(guide_columns)
        if not self.log_pair_losses:
            return self._loss(embeddings, plan, guide)
        return self._as_components(*self._loss_parts(embeddings, plan, guide), plan)

    def _forward_cached(self, columns: list[dict[str, Any]]) -> Tensor:
        grad_enabled = torch.is_grad_enabled()
        ranges = [_minibatch_ranges(features, self.mini_batch_size, self.mini_batch_num_tokens) for features in columns]
        plan, embeddings, states = None, [], []
        guide = [] if self._guided else None
        with torch.no_grad():
            for features, column_ranges in zip(columns, ranges, strict=True):
                parts, guide_parts, column_states = [], [], []
                for begin, end in column_ranges:
                    minibatch = _create_minibatch(features, begin, end)
                    column_states.append(RandContext(*minibatch.values()) if grad_enabled else None)
                    part, plan = self._embed_minibatch(minibatch, plan)
                    parts.append(part)
                    if guide is not None:  # right after the model's mini-batch, as CachedGISTEmbedLoss
                        guide_parts.extend(self._embed_guide([minibatch]))
                embeddings.append(torch.cat(parts, dim=1))
                if guide is not None:
                    guide.append(torch.cat(guide_parts))
                states.append(column_states)
        if not grad_enabled:
            loss, pairs, kl = self._parts(embeddings, plan, guide)
            return loss if pairs is None else self._as_components(loss, pairs, kl, plan)
        leaves = [column.requires_grad_() for column in embeddings]
        loss, pairs, kl = self._parts(leaves, plan, guide)
        cached_grads = torch.autograd.grad(loss, leaves)
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(self._replay, columns=columns, ranges=ranges, states=states,
                                   cached_grads=cached_grads, plan=plan))
        return loss if pairs is None else self._as_components(loss, pairs, kl, plan)

    def _replay(self, grad_output, columns, ranges, states, cached_grads, plan) -> None:
        """Backward hook: re-embed each mini-batch with grad and push the cached gradients through it.

        Each re-embedding runs through ``self.model`` (a DDP wrapper arms its all-reduce for every
        mini-batch backward: the averaged mini-batch gradients add up to the averaged full one).
        """
        with torch.enable_grad():
            replayed = zip(columns, ranges, states, cached_grads, strict=True)
            for features, column_ranges, column_states, grad in replayed:
                for (begin, end), state in zip(column_ranges, column_states, strict=True):
                    with state:
                        part, _ = self._embed_minibatch(_create_minibatch(features, begin, end), plan)
                    part.backward(grad[:, begin:end].to(part.dtype) * grad_output.to(part.dtype))

    def get_config_dict(self) -> dict[str, Any]:
        return {**self._st_config(), "mini_batch_size": self.mini_batch_size, "backend": self.backend,
                "log_pair_losses": self.log_pair_losses}

    def _st_config(self) -> dict[str, Any]:
        raise NotImplementedError


class FusedMatryoshkaLoss(_FusedMatryoshkaBase):
    """Fused ``MatryoshkaLoss(model, MultipleNegativesRankingLoss, ...)``: all dims in one call.

    Args match sentence-transformers' ``MatryoshkaLoss`` (same validation, and ``n_dims_per_step``
    outside -1 and 1..len(matryoshka_dims) refused: :func:`check_per_step`). A base loss of
    ``SUPPORTED_BASE_LOSS`` with finite non-negative weights is fused with all its options (module
    docstring); an option of those classes the kernels cannot express is a ValueError naming it; any
    other base loss runs sentence-transformers' ``MatryoshkaLoss``, with one warning at the first
    forward naming what was not fused. ``mini_batch_size`` enables gradient caching (fused path only;
    a cached base loss's ``mini_batch_size`` does the same, and both must agree when given);
    ``backend`` is passed to :func:`m2d_kernels.matryoshka_2d_infonce`.
    """

    _st_class = MatryoshkaLoss

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
        log_pair_losses: bool = False,
    ) -> None:
        st_args = dict(matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights,
                       n_dims_per_step=n_dims_per_step)
        super().__init__(model, loss, st_args, {"matryoshka_weights": matryoshka_weights}, mini_batch_size, backend)
        self.log_pair_losses = bool(log_pair_losses)

    def _plan(self, num_layers: int = 1) -> _Plan:
        return _Plan((0,), self._dim_weights(self._sample_dims(), 1.0)[None])

    def _embed_minibatch(self, features, plan):
        return self.model(dict(features))["sentence_embedding"][None], plan or self._plan()

    def _embed_columns(self, columns):
        # The same column merging as MultipleNegativesRankingLoss, so dropout draws the same masks. Fresh
        # dicts: DDP(find_unused_parameters=True) fed the caller's dicts marked parameters ready twice.
        columns = [dict(features) for features in columns]
        return [column[None] for column in embed_columns(self.model, columns)], self._plan()

    def _st_config(self) -> dict[str, Any]:
        return {
            "loss": type(self.loss).__name__,
            "matryoshka_dims": self.matryoshka_dims,
            "matryoshka_weights": self.matryoshka_weights,
            "n_dims_per_step": self.n_dims_per_step,
        }

    @property
    def citation(self) -> str:
        return MATRYOSHKA_CITATION


class FusedAdaptiveLayerLoss(_FusedMatryoshkaBase):
    """Fused ``AdaptiveLayerLoss``: the final and the selected prior layers in one call, one encoder pass per column.

    Args match sentence-transformers' ``AdaptiveLayerLoss`` (same validation, and ``n_layers_per_step``
    outside -1 and 1..available refused: :func:`check_per_step`); the pairs are the
    layers at the full embedding width. See the module docstring for the loss, and
    :class:`FusedMatryoshkaLoss` for what is fused and for the extra ``mini_batch_size`` and ``backend``.
    """

    _st_class = AdaptiveLayerLoss
    _renormalises = False
    _merges_columns = False

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        n_layers_per_step: int = 1,
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        layer_weighting: Literal["uniform", "log", "linear"] | Callable[[int], float] = "uniform",
        *,
        mini_batch_size: int | None = None,
        backend: str = "auto",
        log_pair_losses: bool = False,
    ) -> None:
        layer_args = dict(n_layers_per_step=n_layers_per_step, last_layer_weight=last_layer_weight,
                          prior_layers_weight=prior_layers_weight, kl_div_weight=kl_div_weight,
                          kl_temperature=kl_temperature, layer_weighting=layer_weighting)
        self._init_layers(model, loss, layer_args, {}, mini_batch_size, backend)
        self.log_pair_losses = bool(log_pair_losses)

    def _init_layers(self, model, loss, layer_args, matryoshka_args, mini_batch_size, backend) -> None:
        weights = {"last_layer_weight": layer_args["last_layer_weight"],
                   "prior_layers_weight": layer_args["prior_layers_weight"],
                   "matryoshka_weights": matryoshka_args.get("matryoshka_weights")}
        super().__init__(model, loss, {**matryoshka_args, **layer_args}, weights, mini_batch_size, backend)
        check_per_step("n_layers_per_step", layer_args["n_layers_per_step"], _hidden_layer_count(model),
                       "layers before the last (which is always trained)")
        for name, value in layer_args.items():
            setattr(self, name, value)

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
        # The count is checked at construction when the model tells it; here for any other model.
        check_per_step("n_layers_per_step", self.n_layers_per_step, len(candidates),
                       "layers before the last (which is always trained)")
        if 0 < self.n_layers_per_step < len(candidates):
            candidates = random.sample(candidates, self.n_layers_per_step)
        for layer in candidates:
            factor = self.get_layer_weight(layer) / len(candidates) * self.prior_layers_weight
            rows.append(self._dim_weights(self._sample_dims(), factor))
        return _Plan((num_layers - 1, *candidates), torch.stack(rows))

    def _embed_minibatch(self, features, plan):
        # The forward runs through self.model, the object the trainer placed in the loss (DDP,
        # torch.compile, ...): a DDP forward is what arms the gradient all-reduce, and its outputs hold
        # every hidden state, so find_unused_parameters sees all the parameters this loss uses.
        model = _unwrap(self.model, type(self).__name__)
        config = model[0].auto_model.config
        original = config.output_hidden_states
        try:
            config.output_hidden_states = True
            output = self.model(dict(features))
        finally:
            config.output_hidden_states = original
        hidden_states = output["all_layer_embeddings"]
        final = len(hidden_states) - 1
        plan = plan or self._plan(len(hidden_states))
        # The head re-runs on the output dict with one layer's tokens swapped in, as AdaptiveLayerLoss does.
        head_input = {key: value for key, value in output.items() if key != "sentence_embedding"}
        layers = [output["sentence_embedding"] if layer == final
                  else _run_head(model, {**head_input, "token_embeddings": hidden_states[layer]})
                  for layer in plan.layers]
        return torch.stack(layers), plan

    def _extra_loss(self, embeddings: Tensor) -> Tensor | None:
        if self.kl_temperature <= 0 or embeddings.shape[0] == 1:
            return None
        # Teacher: the final layer's softmax over feature dims, detached; "batchmean" per prior layer.
        teacher = F.softmax(embeddings[0] / self.kl_temperature, dim=-1).detach()
        students = F.log_softmax(embeddings[1:] / self.kl_temperature, dim=-1)
        kl = F.kl_div(students, teacher.expand_as(students), reduction="sum") / embeddings.shape[1]
        return kl * (self.kl_temperature * self.kl_div_weight)

    def _layer_config(self) -> dict[str, Any]:
        layer_weighting = self.layer_weighting
        if not isinstance(layer_weighting, str):
            layer_weighting = getattr(layer_weighting, "__name__", "custom")
        return {
            "loss": type(self.loss).__name__,
            "n_layers_per_step": self.n_layers_per_step,
            "last_layer_weight": self.last_layer_weight,
            "prior_layers_weight": self.prior_layers_weight,
            "kl_div_weight": self.kl_div_weight,
            "kl_temperature": self.kl_temperature,
            "layer_weighting": layer_weighting,
        }

    def _st_config(self) -> dict[str, Any]:
        return self._layer_config()

    @property
    def citation(self) -> str:
        return MATRYOSHKA_2D_CITATION


def check_per_step(name: str, value: int, available: int | None, what: str) -> None:
    """``n_layers_per_step`` / ``n_dims_per_step`` must be -1 (all) or 1..``available``.

    sentence-transformers' losses use every layer / dim for any value outside ``1 .. available - 1``: 0, -2 or
    more than there are train on all of them without a word. Those values are refused here, where the intent
    (none? a typo? a model with fewer layers than thought?) cannot be known; ``available`` itself and -1 mean all.
    ``available`` None (a model that does not say its depth before the first forward) checks the sign only.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value == -1 or (value >= 1 and (available is None or value <= available)):
        return
    bound, count = (f"1 to {available}", f"{available} ") if available is not None else (">= 1", "")
    raise ValueError(f"{name} must be -1 (all) or {bound} (the {count}{what}), got {value}; sentence-transformers' "
                     "own loss would silently use all of them")


def _hidden_layer_count(model: nn.Module) -> int | None:
    """The encoder's number of transformer layers, when its first module is a Transformer that says it."""
    try:
        return int(model[0].auto_model.config.num_hidden_layers)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


class FusedMatryoshka2dLoss(FusedAdaptiveLayerLoss):
    """Fused ``Matryoshka2dLoss``: every selected (layer, dim) pair in one call, one encoder pass per column.

    Args match sentence-transformers' ``Matryoshka2dLoss`` (same validation, and ``n_*_per_step`` outside -1 and
    1..available refused: :func:`check_per_step`; see the module docstring
    for the loss, and :class:`FusedMatryoshkaLoss` for what is fused). Extra keyword-only args:
    ``mini_batch_size`` (gradient caching, for batches whose activations do not fit at once) and ``backend``.
    """

    _st_class = Matryoshka2dLoss
    _renormalises = True

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
        log_pair_losses: bool = False,
    ) -> None:
        layer_args = dict(n_layers_per_step=n_layers_per_step, last_layer_weight=last_layer_weight,
                          prior_layers_weight=prior_layers_weight, kl_div_weight=kl_div_weight,
                          kl_temperature=kl_temperature, layer_weighting=layer_weighting)
        matryoshka_args = dict(matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights,
                               n_dims_per_step=n_dims_per_step)
        self._init_layers(model, loss, layer_args, matryoshka_args, mini_batch_size, backend)
        self.log_pair_losses = bool(log_pair_losses)

    def _st_config(self) -> dict[str, Any]:
        # Matryoshka2dLoss's: AdaptiveLayerLoss's keys, then MatryoshkaLoss's ("loss": the base loss).
        return {
            **self._layer_config(),
            "loss": type(self.loss).__name__,
            "matryoshka_dims": self.matryoshka_dims,
            "matryoshka_weights": self.matryoshka_weights,
            "n_dims_per_step": self.n_dims_per_step,
        }


def __getattr__(name: str):
    # Starbucks' STS loss builds on the adapters above and lives in its own module, which imports this one.
    if name == "FusedStarbucksLoss":
        from m2d_kernels.integrations.starbucks import FusedStarbucksLoss

        return FusedStarbucksLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
