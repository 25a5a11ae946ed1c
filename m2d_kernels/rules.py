"""The rules of one rows-vs-columns pass (docs/design.md, "6. The loss family: passes with rules").

Every objective of the library (MultipleNegativesRankingLoss's four directions and two partition
modes, hardness weighting, dot similarity, guided false-negative filtering, score distillation)
is a set of passes: rows ``[L, R, D]`` scored against columns ``[L, C, D]`` under these rules.
The backends implement one pass (``row_statistics`` / ``pass_gradients``, backends/__init__.py)
with the rules as compile-time flags; :mod:`m2d_kernels.objective` composes the passes.

For layer ``l``, dim ``d_m``, row ``i`` and column ``j`` the pass scores::

    s(i, j)  = cos(rows_i[:d_m], cols_j[:d_m])            similarity "cos" (re-normalised prefixes)
             = <rows_i[:d_m], cols_j[:d_m]>               similarity "dot" (plain truncation)
    z(i, j)  = scale * s(i, j) + penalised(i, j) * penalty_strength * stop_grad(s(i, j))
    z(i, j)  = -inf where excluded(i, j)                  (dropped from the softmax)

with ``g_i = row_group[i]``, ``G = group_period`` and column ``j`` belonging to group ``j % G``
(sentence-transformers' layout: the positives of the ``G`` queries, then each hard-negative
column; ``own(i, j) = j % G == g_i``)::

    excluded(i, j)  = exclude_own_group and own(i, j)
                   or guided and guide_rows_i . guide_cols_j > guide_threshold_i and j != positives_i
    penalised(i, j) = not own(i, j)                       penalty "in_batch_negatives"
                    = own(i, j) and j >= G                penalty "hard_negatives" (the row's own hard negatives)
                    = j != g_i                            penalty "all_negatives" (all but the positive)

Shared tiles (the joint partition of several directions reuses one block's products):

    triangle            rows are cols[:R] (the same vectors): only (i, j) with j > i or j >= R is scored,
                        so a symmetric Gram block (query_to_query, positives against positives) is
                        computed once; tiles wholly below the diagonal are skipped
    column_statistics   K > 0: the forward also returns, for each of the first K columns, the softmax
                        statistics of that column over the rows, with z_col(i, j) = scale * s(i, j)
                        (no penalty: the penalty belongs to the rows' softmax) and the same exclusions;
                        e.g. doc_to_query's rows are query_to_doc's positive columns

Exclusion never depends on (l, m), so every pair of a row sees the same columns. With ``teacher``
the pass also accumulates, per pair, ``sum_j exp(z_T(i, j) - offset_T(i)) * z_lm(i, j)`` where the
teacher ``z_T`` is the pair (L - 1, M - 1) of the same pass (score distillation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIMILARITIES = ("cos", "dot")
PENALTIES = ("in_batch_negatives", "hard_negatives", "all_negatives")


@dataclass(frozen=True, eq=False)
class Rules:
    """Rules of one pass. The defaults are the plain InfoNCE pass (cosine, nothing excluded)."""

    similarity: str = "cos"
    # Column groups: column j belongs to group j % group_period, row i to row_group[i] (the global
    # index of the row's query). Needed by exclude_own_group and penalty.
    group_period: int = 0
    row_group: torch.Tensor | None = None  # [R] long, on the rows' device
    exclude_own_group: bool = False  # query_to_query (the row itself) and doc_to_doc (the row's documents)
    penalty: str | None = None  # hardness_mode of MultipleNegativesRankingLoss, or None
    penalty_strength: float = 0.0  # alpha >= 0
    # Guided filtering (GISTEmbedLoss): unit-norm guide embeddings (no gradient) and a per-row threshold.
    guide_rows: torch.Tensor | None = None  # [R, Dg]
    guide_cols: torch.Tensor | None = None  # [C, Dg]
    guide_threshold: torch.Tensor | None = None  # [R]
    teacher: bool = False  # accumulate the teacher-weighted logits (score distillation)
    # Shared tiles (module docstring): score only j > i or j >= R; return the first K columns' statistics.
    triangle: bool = False
    column_statistics: int = 0

    @property
    def guided(self) -> bool:
        return self.guide_rows is not None

    @property
    def is_plain(self) -> bool:
        """Whether the pass is the plain cosine InfoNCE pass of the original kernels."""
        return (self.similarity == "cos" and not self.exclude_own_group and self.penalty is None
                and not self.guided and not self.teacher and not self.triangle and not self.column_statistics)

    def max_logit(self, scale: float) -> float | None:
        """A fixed maximum of every logit (cosine similarity), or None (dot: use the running maximum)."""
        if self.similarity != "cos":
            return None
        return scale + (self.penalty_strength if self.penalty is not None else 0.0)


PLAIN = Rules()


def guide_tie_tolerance(guide_width: int, dtype: torch.dtype) -> float:
    """How far a candidate's guide cosine may exceed the positive's and still tie with it (ties are kept).

    Two evaluations of the dot product of the same unit vectors of width ``Dg`` in different summation
    orders (a GEMM tile against the threshold's row sum, a mini-batch of another size) differ by up to
    about ``Dg * eps``. Without this slack a candidate identical to the positive for the guide (the same
    text twice, texts a re-tokenising guide decodes alike) is dropped or kept by rounding, and a batch of
    such duplicates loses every negative. sentence-transformers keeps exact ties (``>``), so within rounding
    this is its rule; a candidate that is genuinely above the positive's cosine is far above ``Dg * eps``.
    ``dtype``: the one the guide cosines are computed in (the accumulator's).
    """
    return guide_width * torch.finfo(dtype).eps


def check_rules(rules: Rules, n_rows: int, n_cols: int, active=None, distill: bool = False) -> None:
    """ValueError/TypeError naming the field of ``rules`` that a pass of ``n_rows`` x ``n_cols`` cannot apply
    (shapes only, no device sync). Every backend's pass calls it. With ``active`` (the ``[L][M]`` flags), the
    teacher pair must be active when ``rules.teacher`` or ``distill`` (a distillation gradient) asks for it."""
    if not isinstance(rules, Rules):
        raise TypeError(f"rules must be a m2d_kernels.rules.Rules, got {type(rules).__name__}")
    if rules.similarity not in SIMILARITIES:
        raise ValueError(f"rules.similarity must be one of {SIMILARITIES}, got {rules.similarity!r}")
    if rules.penalty is not None and rules.penalty not in PENALTIES:
        raise ValueError(f"rules.penalty must be None or one of {PENALTIES}, got {rules.penalty!r}")
    if rules.exclude_own_group or rules.penalty is not None:
        if rules.group_period <= 0 or rules.row_group is None or tuple(rules.row_group.shape) != (n_rows,):
            raise ValueError(f"rules.group_period must be > 0 and rules.row_group a [{n_rows}] tensor with "
                             f"exclude_own_group or a penalty, got group_period={rules.group_period}, row_group "
                             f"{None if rules.row_group is None else tuple(rules.row_group.shape)}")
    if rules.guided:
        guide_rows, guide_cols, threshold = rules.guide_rows, rules.guide_cols, rules.guide_threshold
        if guide_cols is None or threshold is None:
            raise ValueError("rules.guide_cols and rules.guide_threshold are required with rules.guide_rows")
        if (guide_rows.dim() != 2 or guide_rows.shape[0] != n_rows or guide_cols.shape != (n_cols, guide_rows.shape[1])
                or tuple(threshold.shape) != (n_rows,)):
            raise ValueError(f"rules.guide_rows/guide_cols/guide_threshold must have shapes ({n_rows}, Dg), "
                             f"({n_cols}, Dg), ({n_rows},), got {tuple(guide_rows.shape)}, {tuple(guide_cols.shape)}, "
                             f"{tuple(threshold.shape)}")
    if rules.triangle and n_rows > n_cols:
        raise ValueError(f"rules.triangle needs the rows to be the first columns (R <= C), got R={n_rows}, C={n_cols}")
    if not isinstance(rules.column_statistics, int) or not 0 <= rules.column_statistics <= n_cols:
        raise ValueError(f"rules.column_statistics must be an int in [0, {n_cols}], got {rules.column_statistics!r}")
    if rules.column_statistics and (rules.guided or rules.teacher or distill):
        raise ValueError("rules.column_statistics does not combine with a guide or a teacher (distillation)")
    if active is not None and (rules.teacher or distill) and not active[-1][-1]:
        raise ValueError("the teacher pair (last layer, largest dim) must be active with rules.teacher or "
                         "distill_coef")


def column_masks(rules: Rules, n_cols: int, positives: torch.Tensor, guide_similarity: torch.Tensor | None = None,
                 row_start: int = 0):
    """``(excluded, penalised)`` ``[R, C]`` bool masks of a whole pass (either may be None: nothing).

    Plain torch, ``O(R x C)``: the oracle and the chunked ``torch`` backend call it on a chunk of rows
    (``rules.row_group`` / ``positives`` / ``guide_similarity`` restricted to those rows, which start at
    row ``row_start`` of the pass: the triangle needs it).
    ``guide_similarity`` is ``guide_rows @ guide_cols.T`` for those rows.
    """
    device = positives.device
    cols = torch.arange(n_cols, device=device)[None, :]
    own = None
    if rules.exclude_own_group or rules.penalty is not None:
        own = cols % rules.group_period == rules.row_group[:, None]
    excluded = own if rules.exclude_own_group else None
    if rules.triangle:
        rows = torch.arange(row_start, row_start + len(positives), device=device)[:, None]
        below = cols <= rows  # j <= i < R: in the square part, on or below the diagonal
        excluded = below if excluded is None else excluded | below
    if rules.guided:
        guided = (guide_similarity > rules.guide_threshold[:, None]) & (cols != positives[:, None])
        excluded = guided if excluded is None else excluded | guided
    penalised = None
    if rules.penalty == "in_batch_negatives":
        penalised = ~own
    elif rules.penalty == "hard_negatives":
        penalised = own & (cols >= rules.group_period)
    elif rules.penalty == "all_negatives":
        penalised = cols != rules.row_group[:, None]
    return excluded, penalised
