"""Fused Starbucks STS loss: ``StarbucksLoss`` of the Starbucks paper with one encoder pass per column.

Starbucks (Zhuang, Wang, Koopman, Zuccon, "Starbucks: Improved Training for 2D Matryoshka
Embeddings", arXiv:2410.13230) trains a fixed diagonal of (layer, dim) pairs. This module follows its
public code, github.com/ielab/Starbucks, ``sts/starbucks_loss.py`` (``StarbucksLoss``, commit 6cc89d2)
with ``sts/matryoshkaloss_modified.py`` (the ``MatryoshkaLoss`` it wraps), line by line::

    total = last_layer_weight * base(final layer, full width)
          + sum_{(l, d) in S} [ base(layer l, d)
                                + kl_div_weight * kl_temperature * KL(softmax(e_final[:, :d]) || softmax(e_l[:, :d])) ]

- ``base(l, d)``: the base loss on layer ``l``'s pooled embeddings truncated to ``d`` and
  L2-normalised (the modified ``MatryoshkaLoss`` normalises after truncating, so a
  ``MultipleNegativesRankingLoss`` with ``dot_score`` computes cosines too).
- Layers are 1-indexed (layer ``k`` is hidden state ``k``; the embedding output is 0) and run through
  the model's own modules after the transformer (pooling, Dense, Normalize). The final layer is
  always trained, at the full width (the original hard-codes 768, BERT-base's width).
- ``S``: the entries of ``matryoshka_layers`` below the final layer, the ``k``-th kept layer paired
  with ``matryoshka_dims[k]``. With ``0 < n_selections_per_step < num_layers - 1``, ``n`` of them are
  drawn with ``random.sample`` (Python's ``random``, as the original) and, as the original's
  ``dim_indices = [dims[layer_indices.index(i)] for i in layer_indices]`` does, the ``k``-th *drawn*
  layer gets ``matryoshka_dims[k]``: a drawn layer does not keep its own dim. Reproduced on purpose so
  that the fused loss equals the original; with the default ``-1`` (the paper's runs) all pairs are used.
- KL: ``F.kl_div(F.log_softmax(p), F.softmax(q), reduction="batchmean")`` over the feature dim of the
  raw pooled embeddings of all columns (``p`` layer ``l``, ``q`` the final layer) truncated to ``d``,
  no temperature inside the softmax (``kl_temperature`` only scales the term, and 0 switches it off),
  and the final layer is *not* detached (sentence-transformers' ``AdaptiveLayerLoss`` detaches it since
  its issue #3757; Starbucks predates that). ``[rows, d]``-sized: plain torch.
- ``matryoshka_weights`` is accepted and, as in the original (whose modified ``MatryoshkaLoss`` stores
  but never applies it), does not change the loss; a warning says so when it is not all ones.
  ``prior_layers_weight`` is 1.

The original runs the encoder once per column and then the base loss once per pair; here every
column runs the encoder once with ``output_hidden_states`` and, when the base loss is a
``MultipleNegativesRankingLoss`` the kernels express, one :func:`m2d_kernels.matryoshka_2d_infonce`
call computes every pair (a diagonal ``[L, M]`` weight matrix). Any other base loss with
``compute_loss_from_embeddings`` (``CoSENTLoss``, the paper's low-resource STS loss, ...) is computed
per pair from the same embeddings, with one warning. ``mini_batch_size`` turns on gradient caching, as
in :class:`m2d_kernels.integrations.sentence_transformers.FusedMatryoshka2dLoss`.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim, dot_score
from torch import Tensor, nn

from m2d_kernels.functional import matryoshka_2d_infonce
from m2d_kernels.integrations.sentence_transformers import FusedAdaptiveLayerLoss

STARBUCKS_CITATION = """
@misc{zhuang2024starbucks,
    title={Starbucks: Improved Training for 2D Matryoshka Embeddings},
    author={Shengyao Zhuang and Shuai Wang and Bevan Koopman and Guido Zuccon},
    year={2024},
    eprint={2410.13230},
    archivePrefix={arXiv},
    primaryClass={cs.IR}
}
"""


@dataclass(frozen=True)
class _StarbucksPlan:
    """The pairs of one step: ``layers`` are hidden-state indices, the final layer first (its rows of the
    embeddings); ``pairs`` are ``(hidden-state index, dim)`` in the original's order, dim None = full width."""

    layers: tuple[int, ...]
    pairs: tuple[tuple[int, int | None], ...]


def _fused_mnrl_options(loss: nn.Module) -> dict[str, Any] | None:
    """Keyword arguments of :func:`matryoshka_2d_infonce` equal to ``loss`` on L2-normalised vectors, or None.

    Every MultipleNegativesRankingLoss option maps (directions, partition_mode, hardness, scale,
    gather_across_devices); :func:`matryoshka_2d_infonce` takes the fast path when they are the defaults.
    """
    if not isinstance(loss, MultipleNegativesRankingLoss) or any(
        getattr(type(loss), method) is not getattr(MultipleNegativesRankingLoss, method)
        for method in ("forward", "compute_loss_from_embeddings")
    ):
        return None
    # The vectors are normalised after truncation, so the dot product is the cosine.
    if loss.similarity_fct not in (cos_sim, dot_score):
        return None
    directions = tuple(loss.directions)
    if "query_to_doc" not in directions:
        return None
    options = {"scale": float(loss.scale), "directions": directions, "partition_mode": loss.partition_mode,
               "hardness_mode": loss.hardness_mode, "hardness_strength": float(loss.hardness_strength)}
    if loss.gather_across_devices:
        options["gather_across_devices"] = True
    return options


def _int_list(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of ints, got {type(values).__name__}")
    values = list(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be a non-empty list of ints, got {values!r}")
    if min(values) < 1:
        raise ValueError(f"{name} must hold positive ints, got {values}")
    return values


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class FusedStarbucksLoss(FusedAdaptiveLayerLoss):
    """Fused ``StarbucksLoss`` (ielab/Starbucks): a diagonal of (layer, dim) pairs, one encoder pass per column.

    Args (the original's; see the module docstring for the loss):
        model: the SentenceTransformer (a Transformer module first).
        loss: the base loss, e.g. ``MultipleNegativesRankingLoss(model)`` (fused) or ``CoSENTLoss(model)``.
        matryoshka_layers: 1-indexed layers, e.g. ``[2, 4, 6, 8, 10, 12]``; entries at or above the
            final layer are dropped (the final layer is always trained, at full width).
        matryoshka_dims: one dim per layer, e.g. ``[32, 64, 128, 256, 512, 768]``.
        matryoshka_weights: accepted for compatibility; does not change the loss (as in the original).
        n_selections_per_step: pairs drawn per step (``-1``: all).
        last_layer_weight: weight of the final layer's base loss.
        kl_div_weight, kl_temperature: the KL term's factors; ``kl_temperature <= 0`` drops the term.
        mini_batch_size: gradient caching (embed in mini-batches without grad, replay with grad).
        backend: passed to :func:`m2d_kernels.matryoshka_2d_infonce`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        matryoshka_layers: Sequence[int],
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | None = None,
        n_selections_per_step: int = -1,
        last_layer_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        *,
        mini_batch_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        nn.Module.__init__(self)  # not the base's: it builds a sentence-transformers loss, and there is none
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be a sentence-transformers loss module, got {type(loss).__name__}")
        self.matryoshka_layers = _int_list("matryoshka_layers", matryoshka_layers)
        self.matryoshka_dims = _int_list("matryoshka_dims", matryoshka_dims)
        if len(self.matryoshka_layers) != len(self.matryoshka_dims):
            raise ValueError(f"matryoshka_layers and matryoshka_dims must have the same length (one dim per layer), "
                             f"got {len(self.matryoshka_layers)} and {len(self.matryoshka_dims)}")
        if matryoshka_weights is not None:
            matryoshka_weights = [_real("matryoshka_weights", w) for w in matryoshka_weights]
            if len(matryoshka_weights) != len(self.matryoshka_dims):
                raise ValueError(f"matryoshka_weights must have one weight per dim ({len(self.matryoshka_dims)}), "
                                 f"got {len(matryoshka_weights)}")
            if any(w != 1 for w in matryoshka_weights):
                warnings.warn("FusedStarbucksLoss: matryoshka_weights does not change the loss (Starbucks' "
                              "StarbucksLoss stores it but never applies it)", UserWarning, stacklevel=2)
        self.matryoshka_weights = matryoshka_weights
        if isinstance(n_selections_per_step, bool) or not isinstance(n_selections_per_step, int):
            raise TypeError(f"n_selections_per_step must be an int, got {type(n_selections_per_step).__name__}")
        self.n_selections_per_step = n_selections_per_step
        self.last_layer_weight = _real("last_layer_weight", last_layer_weight)
        self.prior_layers_weight = 1.0
        self.kl_div_weight = _real("kl_div_weight", kl_div_weight)
        self.kl_temperature = _real("kl_temperature", kl_temperature)
        if mini_batch_size is not None and (isinstance(mini_batch_size, bool) or int(mini_batch_size) < 1):
            raise ValueError(f"mini_batch_size must be a positive int or None, got {mini_batch_size!r}")
        self.model = model
        self.loss = loss
        self.mini_batch_size = None if mini_batch_size is None else int(mini_batch_size)
        self.mini_batch_num_tokens = None
        self.backend = backend
        # The base class's switches: no guide model, any number of columns.
        self._guided, self._max_columns = False, None
        self.unfused = None  # the base class's sentence-transformers fallback; here the per-pair path below
        self._fused = _fused_mnrl_options(loss)
        if self._fused is None and not callable(getattr(loss, "compute_loss_from_embeddings", None)):
            raise TypeError(f"loss must be a sentence-transformers loss with compute_loss_from_embeddings, "
                            f"got {type(loss).__name__}")
        self._warned = False
        self._labels = None

    def _plan(self, num_hidden_states: int) -> _StarbucksPlan:
        # The original's forward, with k = its 0-based index + 1 (hidden state k).
        num_layers = num_hidden_states - 1
        final = num_layers
        layers = [k for k in self.matryoshka_layers if k < num_layers]
        dims = self.matryoshka_dims[:len(layers)]
        n = self.n_selections_per_step
        if 0 < n < num_layers - 1:
            if n > len(layers):
                raise ValueError(f"n_selections_per_step={n} exceeds the {len(layers)} matryoshka_layers below the "
                                 f"final layer {final} (Starbucks' random.sample raises here too)")
            layers = random.sample(layers, n)
            dims = [self.matryoshka_dims[layers.index(k)] for k in layers]  # the original's expression
        pairs = ((final, None), *zip(layers, dims))
        return _StarbucksPlan(tuple(dict.fromkeys(layer for layer, _ in pairs)), pairs)

    def _loss(self, columns: list[Tensor], plan: _StarbucksPlan, guide: None = None) -> Tensor:
        width = columns[0].shape[-1]
        too_wide = [d for _, d in plan.pairs if d is not None and d > width]
        if too_wide:
            raise ValueError(f"matryoshka_dims {too_wide} exceed the model's embedding width {width}")
        row = {layer: index for index, layer in enumerate(plan.layers)}
        weighted = [(row[layer], width if d is None else d, self.last_layer_weight if d is None else 1.0)
                    for layer, d in plan.pairs]
        if self._fused is not None:
            dims = sorted({d for _, d, _ in weighted})
            weights = torch.zeros(len(plan.layers), len(dims), dtype=torch.float64)
            for r, d, w in weighted:
                weights[r, dims.index(d)] += w
            # reduction="none" with |w| as the active mask: the original allows any real last_layer_weight.
            losses = matryoshka_2d_infonce(columns[0], torch.cat(columns[1:], dim=1), dims, weights.abs(),
                                           reduction="none", backend=self.backend, **self._fused)
            total = (losses * weights.to(device=losses.device, dtype=losses.dtype)).sum()
        else:
            if not self._warned:
                self._warned = True
                warnings.warn(f"FusedStarbucksLoss: the base loss {type(self.loss).__name__} is not fused; computed "
                              "per (layer, dim) pair from the shared embeddings", UserWarning, stacklevel=3)
            total = sum(w * self.loss.compute_loss_from_embeddings(
                [F.normalize(column[r, :, :d], p=2, dim=-1) for column in columns], self._labels)
                for r, d, w in weighted)
        if self.kl_temperature > 0 and self.kl_div_weight != 0 and len(weighted) > 1:
            embeddings = torch.cat(columns, dim=1)  # every column's rows, as the original's concatenated cache
            teacher = embeddings[0]  # not detached, as the original
            kl = sum(F.kl_div(F.log_softmax(embeddings[r, :, :d], dim=-1), F.softmax(teacher[:, :d], dim=-1),
                              reduction="batchmean") for r, d, _ in weighted[1:])
            total = total + kl * (self.kl_temperature * self.kl_div_weight)
        return total

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        self._labels = labels  # the per-pair path hands them to the base loss; the fused one ignores them
        try:
            return super().forward(sentence_features, labels)
        finally:
            self._labels = None

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "loss": type(self.loss).__name__,
            "n_selections_per_step": self.n_selections_per_step,
            "last_layer_weight": self.last_layer_weight,
            "prior_layers_weight": self.prior_layers_weight,
            "kl_div_weight": self.kl_div_weight,
            "kl_temperature": self.kl_temperature,
            "matryoshka_layers": self.matryoshka_layers,
            "matryoshka_dims": self.matryoshka_dims,
            "mini_batch_size": self.mini_batch_size,
            "backend": self.backend,
        }

    @property
    def citation(self) -> str:
        return STARBUCKS_CITATION
