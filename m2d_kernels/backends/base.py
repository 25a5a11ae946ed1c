"""The backend contract: one pass of rows against a block of columns, statistics and gradients by name.

Every loss the library computes is a composition of **passes** (:mod:`m2d_kernels.objective`): rows
``[L, R, D]`` scored against columns ``[L, C, D]`` under :class:`m2d_kernels.rules.Rules`, for every
(layer, dim) pair at once. A backend implements the pass twice, autograd-free:

    row_statistics(rows, cols, dims, active, scale, positives, rules, norms) -> PassStatistics
    pass_gradients(rows, cols, dims, active, scale, positives, softmax, coef, rules,
                   distill_coef, columns, norms) -> PassGradients

and the one autograd Function of :mod:`m2d_kernels.objective` combines them: the statistics of several
passes (directions, devices of a ring) merge into one softmax per row, and each pass's backward gets the
merged statistics. So a loss is never computed along a second path, and nothing of size ``R x C`` is
stored: only ``[L, R, M]`` tables.

Arguments shared by both calls:

- ``dims``: strictly increasing ints ``d_1 < ... < d_M <= D``; ``active``: ``[L][M]`` bools, an inactive
  pair costs nothing and gets finite statistics and no gradient;
- ``scale``: the logits are ``z = scale * s`` (``s`` the cosine of the prefixes, or their dot product);
- ``positives`` ``[R]`` long: the column of this block holding row ``i``'s positive, -1 when it lies in
  another block (no positive term);
- ``norms`` (cosine only, optional): ``(row_tables, col_tables)``, each the two ``[L, R, M]`` tables of
  :func:`m2d_kernels.numerics.inverse_prefix_norms`, so that a caller running several passes over the
  same tensors computes them once.

Units: natural logs. A softmax's statistics are relative to an offset (its maximum, or a fixed maximum
where the backend uses one): ``log_sum = log sum_j exp(z_j - offset)``, so two disjoint sets of columns
combine as ``o = max(o1, o2)``, ``log_sum = logaddexp(l1 + o1 - o, l2 + o2 - o)`` (:func:`combine`) and a
row's loss is ``offset + log_sum - positive_logit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from m2d_kernels.rules import PLAIN, Rules


@dataclass(frozen=True)
class Softmax:
    """Statistics of one softmax per row (or column) and (layer, dim) pair, each ``[L, R, M]``."""

    offset: torch.Tensor  # the maximum the sum is relative to (0 where every entry is excluded)
    log_sum: torch.Tensor  # log sum_j exp(z_j - offset); -inf where every entry is excluded
    # E_p[z] of this softmax (rules.scale_slope): d LSE / d scale = expected_logit / scale.
    expected_logit: torch.Tensor | None = None


@dataclass(frozen=True)
class PassStatistics:
    """What a pass's forward returns."""

    rows: Softmax  # [L, R, M] each row's softmax over this block's columns
    positive_logit: torch.Tensor  # [L, R, M] z(i, positives_i); 0 where positives_i == -1 or inactive
    # [L, R, M] sum_j exp(z_T(i, j) - offset_T(i)) z_lm(i, j), the teacher T being pair (L - 1, M - 1)
    # (rules.teacher, score distillation); else None.
    teacher_sum: torch.Tensor | None = None
    # [L, K, M] the first K columns' softmaxes over the rows (rules.column_statistics = K); else None.
    columns: Softmax | None = None


@dataclass(frozen=True)
class PassGradients:
    """What a pass's backward returns: the gradients from this block, in the accumulator dtype where the
    backend computes them unrounded (torch, cpp, reference), else in the input dtype (triton)."""

    rows: torch.Tensor  # [L, R, D]
    cols: torch.Tensor  # [L, C, D]


class Backend(Protocol):
    """A backend module (``m2d_kernels.backends.<name>``)."""

    # The input dtypes the backend computes in ("auto" skips a backend for other dtypes).
    SUPPORTED_DTYPES: tuple[torch.dtype, ...]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why the backend cannot run on ``device``, or None when it can."""

    def shares_tiles(self, similarity: str, scale: float) -> bool:
        """Whether the pass applies ``rules.triangle`` and ``rules.column_statistics`` for this similarity and
        scale; the composer otherwise runs one pass per direction."""

    def row_statistics(self, rows: torch.Tensor, cols: torch.Tensor, dims: tuple[int, ...],
                       active: tuple[tuple[bool, ...], ...], scale: float, positives: torch.Tensor,
                       rules: Rules = PLAIN, norms=None) -> PassStatistics:
        """The pass's forward: each row's softmax statistics over these columns (and the rules' extras)."""

    def pass_gradients(self, rows: torch.Tensor, cols: torch.Tensor, dims: tuple[int, ...],
                       active: tuple[tuple[bool, ...], ...], scale: float, positives: torch.Tensor,
                       softmax: Softmax, coef: torch.Tensor, rules: Rules = PLAIN,
                       distill_coef: torch.Tensor | None = None, columns: Softmax | None = None,
                       norms=None) -> PassGradients:
        """The pass's backward: the gradients, from this block's columns, of

            sum_lm coef[l, m] * sum_i (LSE_i - z(i, positives_i))
          + sum_lm distill_coef[l, m] * sum_i (LSE_i - sum_j p_T(i, j) z(i, j))          (distill_coef)
          + sum_lm coef[l, m] * sum_{j < K} LSE_col_j                                      (column_statistics)

        where each softmax has the given (combined) statistics ``softmax`` ``[L, R, M]`` and ``columns``
        ``[L, K, M]`` (required with ``rules.column_statistics``), so that summing over the blocks gives the
        gradient of the whole softmax. ``coef`` ``[L, M]`` weighs a row's loss (``d total / d loss_lm / R``
        for a mean over rows); the teacher ``p_T`` is pair (L - 1, M - 1)."""


def combine(a: Softmax, b: Softmax) -> Softmax:
    """The statistics of the union of two disjoint column sets, each relative to its own offset."""
    offset = torch.maximum(a.offset, b.offset)
    log_sum = torch.logaddexp(a.log_sum + (a.offset - offset), b.log_sum + (b.offset - offset))
    expected = None
    if a.expected_logit is not None and b.expected_logit is not None:
        # E over the union: each part's expectation weighted by its share of the total mass.
        share_a = (a.log_sum + (a.offset - offset) - log_sum).exp()
        expected = share_a * a.expected_logit + (1 - share_a) * b.expected_logit
    return Softmax(offset, log_sum, expected)


def check_columns(rules: Rules, columns: Softmax | None, n_layers: int, n_dims: int) -> None:
    """ValueError unless ``columns`` (``pass_gradients``) are the ``[L, K, M]`` statistics that
    ``rules.column_statistics = K`` needs (and None without it)."""
    n_stat_cols = rules.column_statistics
    if not n_stat_cols:
        if columns is not None:
            raise ValueError("columns (column statistics) are given, but rules.column_statistics is 0")
        return
    if columns is None:
        raise ValueError("columns (the combined column statistics) are required with rules.column_statistics")
    expected = (n_layers, n_stat_cols, n_dims)
    for name in ("offset", "log_sum"):
        if tuple(getattr(columns, name).shape) != expected:
            raise ValueError(f"columns.{name} must have shape {expected} ([L, K, M]), got "
                             f"{tuple(getattr(columns, name).shape)}")
