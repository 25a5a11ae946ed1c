"""One grid of the pass contract (m2d_kernels/backends/base.py) for every backend against the float64 reference.

Each backend's ``row_statistics`` / ``pass_gradients`` against ``m2d_kernels.backends.reference``'s, which
materialises every pair's ``[R, C]`` logits, computed in float64 from the same (rounded) inputs:

- rows' and columns' log-sum-exps ``offset + log_sum`` (the offsets themselves may differ: a fixed or a running
  maximum), ``-inf`` exactly where every entry is excluded, finite statistics for inactive pairs;
- the positive logits, the teacher sums as ``E_{p_T}[z]`` (each side's sum is relative to its own teacher
  offset), ``expected_logit`` with ``rules.scale_slope``;
- both gradients with random ``coef`` (one zero) and ``distill_coef`` (rules.teacher), given the reference's
  statistics (the combined statistics of a composed loss: any statistics must do).

The grid is not a full cartesian product: every rule x scale on one shape (``test_rules``), every shape x a few
rule sets (``test_shapes``), float32 for every rule (``test_float32_rules``), and bf16/fp16 within twice the
reference's own error in that precision (``test_low_precision``), and a positive in an excluded column
(``test_a_positive_in_an_excluded_column``, with the known disagreements marked). Tolerances: float64 1e-9,
float32 helpers' fp32 tolerances, Triton's fp32 products (tf32x3) helpers' "tf32x3"; gradients relative to their
largest entry (they grow with the scale). Triton runs under the interpreter on the CPU (conftest.py), fp32, bf16
and fp16 only, on a subset of the grid (see INTERPRETER_RULE_SHAPE); a GPU runs all of it.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, make_inputs

from m2d_kernels.backends import reference, unavailable_reason
from m2d_kernels.backends.base import PassGradients, PassStatistics, Softmax
from m2d_kernels.rules import Rules

BACKENDS = ("torch", "cpp", "triton")
MODULES = {"torch": "m2d_kernels.backends.torch_prefix", "cpp": "m2d_kernels.backends.cpp",
           "triton": "m2d_kernels.backends.triton_kernels"}
DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
INTERPRETED = not torch.cuda.is_available()  # Triton under TRITON_INTERPRET=1 (conftest.py)


def load(name):
    """The backend module, or a skip naming why it cannot run here."""
    if name == "triton":
        pytest.importorskip("triton")
    reason = unavailable_reason(name, torch.device(DEVICE[name]))
    if reason is not None:
        pytest.skip(f"{name} backend unavailable: {reason}")
    return importlib.import_module(MODULES[name])


def full_precision(name):
    """The most precise input dtype the backend takes: float64, or float32 for Triton."""
    return torch.float32 if name == "triton" else torch.float64


def tolerance_key(name, dtype):
    """helpers.TOLERANCES' key: Triton's fp32 products are tf32x3 (emulated under the interpreter too)."""
    return "tf32x3" if name == "triton" and dtype == torch.float32 else dtype


# ---------------------------------------------------------------------------------------------- cases
#
# rule -> (Rules fields). "G" stands for the group fields (group_period = R, row i in group i), "guide" for a
# guide that masks about a third of the columns and every column of the last row (R > 2), "K" for
# column_statistics = R. Triangle rules make the rows cols[:R] (the rule's premise).
RULES = {
    "plain": {},
    "dot": {"similarity": "dot"},
    "exclude_own_group": {"G": True, "exclude_own_group": True},
    **{f"{penalty}-{strength:g}": {"G": True, "penalty": penalty, "penalty_strength": strength}
       for penalty in ("in_batch_negatives", "hard_negatives", "all_negatives") for strength in (0.5, 9.0)},
    "guided": {"guide": True},
    "teacher": {"teacher": True},
    "triangle": {"triangle": True},
    "column_statistics": {"K": True},
    "triangle-column_statistics": {"triangle": True, "K": True},
    "scale_slope": {"scale_slope": True},
    "scale_slope-column_statistics": {"scale_slope": True, "K": True},
    # Combinations the objectives use: GIST with hardness and distillation; doc_to_doc's shared triangle.
    "guided-exclude-penalty-teacher": {"guide": True, "G": True, "exclude_own_group": True,
                                       "penalty": "all_negatives", "penalty_strength": 0.5, "teacher": True},
    "dot-guided-teacher": {"similarity": "dot", "guide": True, "teacher": True},
    "triangle-exclude-column_statistics": {"triangle": True, "G": True, "exclude_own_group": True, "K": True},
}


def active_pairs(n_layers, n_dims):
    """Every pair active but one (never the teacher pair (L - 1, M - 1))."""
    off = (0, 1) if n_dims > 2 else (0, 0)
    return tuple(tuple(n_layers == 1 or (layer, m) != off for m in range(n_dims)) for layer in range(n_layers))


def make_case(rule, n_rows, n_cols, n_features, n_layers=2, seed=0):
    """float64 rows ``[L, R, D]``, columns ``[L, C, D]``, positives ``[R]`` and the Rules of ``RULES[rule]``.

    Positives: row i's own column i ((i + 1) % R, another group, where the own group is excluded; some j > i
    with the triangle), row 1's in another block (-1); rows whose every column is guided away have none."""
    fields = dict(RULES[rule])
    rows, cols = make_inputs(n_layers, n_rows, n_cols, n_features, seed=seed, requires_grad=False)
    index = torch.arange(n_rows)
    if fields.pop("triangle", False):
        rows = cols[:, :n_rows].clone()
        positives = torch.where(index + 1 + index % 3 < n_cols, index + 1 + index % 3, -1)
        fields["triangle"] = True
    elif fields.get("exclude_own_group"):
        positives = (index + 1) % n_rows if n_rows > 1 else torch.full((n_rows,), -1)
    else:
        positives = index % n_cols
    if n_rows > 1:
        positives[1] = -1
    if fields.pop("G", False):
        fields.update(group_period=n_rows, row_group=index.clone())
        if fields.get("exclude_own_group"):  # a positive in the row's own (excluded) group: none
            positives = torch.where(positives % n_rows == index, -1, positives)
    if fields.pop("K", False):
        fields["column_statistics"] = min(n_rows, n_cols)
    if fields.pop("guide", False):
        generator = torch.Generator().manual_seed(seed + 1)
        guide_rows = F.normalize(torch.randn(n_rows, 7, generator=generator, dtype=torch.float64), dim=-1)
        guide_cols = torch.randn(n_cols, 7, generator=generator, dtype=torch.float64)
        kept = positives >= 0
        guide_cols[positives[kept]] = guide_rows[kept] + 0.3 * guide_cols[positives[kept]]  # GIST: the positive
        guide_cols = F.normalize(guide_cols, dim=-1)                                          # scores high
        similarities = (guide_rows @ guide_cols.T).sort(1).values
        # Midway between two sorted guide similarities: about a third of the columns masked, no ties.
        k = (2 * n_cols) // 3
        threshold = ((similarities[:, max(k - 1, 0)] + similarities[:, min(k, n_cols - 1)]) / 2 if n_cols > 1
                     else similarities[:, 0] + 0.5)
        if n_rows > 2:
            threshold[-1] = -2.0  # every column of the last row masked
            positives[-1] = -1
        fields.update(guide_rows=guide_rows, guide_cols=guide_cols, guide_threshold=threshold)
    if fields.get("similarity") == "dot":  # dot logits of magnitude ~10-100 at scale 1
        rows, cols = rows * 1.5, cols * 1.5
    return rows, cols, positives, Rules(**fields)


def dims_of(n_features):
    return {48: (5, 20, 48), 64: (16, 32, 64), 100: (24, 40, 100)}[n_features]


# ---------------------------------------------------------------------------------------------- checks


def on_device(rules, device):
    names = ("row_group", "guide_rows", "guide_cols", "guide_threshold")
    tensors = {name: getattr(rules, name).to(device) for name in names if getattr(rules, name) is not None}
    return replace(rules, **tensors) if tensors else rules


def coefficients(rules, n_layers, n_dims, seed):
    generator = torch.Generator().manual_seed(seed)
    coef = torch.rand(n_layers, n_dims, generator=generator, dtype=torch.float64) + 0.1
    coef[0, -1] = 0.0  # a zero weight
    distill = None
    if rules.teacher:  # the distillation gradient needs rules.teacher's pair active (active_pairs keeps it)
        distill = torch.rand(n_layers, n_dims, generator=generator, dtype=torch.float64) + 0.1
        distill[-1, 0] = 0.0
    return coef, distill


def cast_softmax(softmax, like, device):
    if softmax is None:
        return None
    return Softmax(softmax.offset.to(device=device, dtype=like.dtype), softmax.log_sum.to(device=device,
                                                                                          dtype=like.dtype))


def assert_near(got, expected, key, name, relative_to=None):
    """helpers' tolerances of ``key``; ``relative_to``: scale both by their largest entry (at least 1)."""
    atol, rtol = TOLERANCES[key]
    got, expected = got.double().cpu(), expected.double().cpu()
    if relative_to is not None:
        atol = atol * max(1.0, relative_to)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_same_lse(got: Softmax, expected: Softmax, on, key, name):
    """offset + log_sum where active: the same -inf (nothing kept), the finite ones within tolerance; finite
    offsets everywhere and no NaN (inactive pairs included)."""
    assert torch.isfinite(got.offset).all(), f"{name}: offset must be finite"
    assert not torch.isnan(got.log_sum).any(), f"{name}: log_sum NaN"
    lse, want = (got.offset.double().cpu() + got.log_sum.double().cpu())[on], (expected.offset + expected.log_sum)[on]
    empty = torch.isneginf(want)
    assert torch.equal(torch.isneginf(lse), empty), f"{name}: log_sum -inf exactly where everything is excluded"
    assert_near(lse[~empty], want[~empty], key, f"{name} log-sum-exp")
    return empty


def check_pass(name, module, rows64, cols64, dims, active, scale, positives, rules, dtype, seed=0):
    """The backend's pass on ``rows64``/``cols64`` rounded to ``dtype`` against the float64 reference pass of
    the same rounded values."""
    device, key = DEVICE[name], tolerance_key(name, dtype)
    rows, cols = rows64.to(device=device, dtype=dtype), cols64.to(device=device, dtype=dtype)
    rows64, cols64 = rows.double().cpu(), cols.double().cpu()  # input rounding is no one's error
    device_rules, device_positives = on_device(rules, device), positives.to(device)
    n_layers, n_dims = len(active), len(dims)
    expected = reference.row_statistics(rows64, cols64, dims, active, scale, positives, rules)
    shares = not rules.column_statistics or module.shares_tiles(rules.similarity, scale)
    if shares:
        got = module.row_statistics(rows, cols, dims, active, scale, device_positives, device_rules)
        assert isinstance(got, PassStatistics) and isinstance(got.rows, Softmax)
        rows_on = torch.tensor(active)[:, None, :].expand(n_layers, rows.shape[1], n_dims)
        empty = assert_same_lse(got.rows, expected.rows, rows_on, key, "rows")
        assert not empty.all() or rows.shape[1] == 1 or rules.triangle or rules.exclude_own_group, "a row keeps some"
        assert_near(got.positive_logit, expected.positive_logit, key, "positive logit")
        if rules.teacher:
            # sum_j p_T(i, j) z_lm(i, j): each side divided by its own teacher sum exp(log_sum_T).
            def teacher_mean(stats):
                total = stats.rows.log_sum[-1, :, -1].double().cpu()[None, :, None]
                return torch.where(torch.isfinite(total), stats.teacher_sum.double().cpu() * (-total).exp(), 0.0)

            want = teacher_mean(expected)[rows_on]
            assert_near(teacher_mean(got)[rows_on], want, key, "teacher sums", want.abs().max().item())
        else:
            assert got.teacher_sum is None
        if rules.scale_slope:
            want = expected.rows.expected_logit[rows_on]
            assert_near(got.rows.expected_logit.double().cpu()[rows_on], want, key, "rows' E_p[z]", scale)
        else:
            assert got.rows.expected_logit is None
        if rules.column_statistics:
            assert got.columns.offset.shape == got.columns.log_sum.shape == expected.columns.offset.shape
            columns_on = torch.tensor(active)[:, None, :].expand_as(expected.columns.offset)
            assert_same_lse(got.columns, expected.columns, columns_on, key, "columns")
            if rules.scale_slope:
                want = expected.columns.expected_logit[columns_on]
                assert_near(got.columns.expected_logit.double().cpu()[columns_on], want, key, "columns' E_p[z]",
                            scale)
        else:
            assert got.columns is None
        like = got.rows.offset
    else:  # the backend's forward refuses these statistics (Triton: cosine at scale <= 40); the backward takes any
        with pytest.raises(ValueError, match="column_statistics"):
            module.row_statistics(rows, cols, dims, active, scale, device_positives, device_rules)
        like = torch.empty(0, dtype=torch.float64 if name == "triton" else torch.promote_types(dtype, torch.float32))

    coef, distill = coefficients(rules, n_layers, n_dims, seed)
    want = reference.pass_gradients(rows64, cols64, dims, active, scale, positives, expected.rows, coef, rules,
                                    distill, expected.columns)
    have = module.pass_gradients(rows, cols, dims, active, scale, device_positives,
                                 cast_softmax(expected.rows, like, device), coef.to(device=device, dtype=like.dtype),
                                 device_rules, None if distill is None else distill.to(device=device, dtype=like.dtype),
                                 cast_softmax(expected.columns, like, device))
    assert isinstance(have, PassGradients)
    for label, g, w in (("d rows", have.rows, want.rows), ("d cols", have.cols, want.cols)):
        assert g.shape == w.shape and torch.isfinite(g).all(), f"{label}: shape or not finite"
        assert_near(g, w, key, label, w.abs().max().item())


# ---------------------------------------------------------------------------------------------- the grid

COS_SCALES = (20.0, 100.0, 500.0)  # fp64: fixed maximum up to 350 (numerics.FIXED_MAX_SPAN), fp32 up to 40
DOT_SCALES = (1.0, 0.05)  # dot logits are unbounded: always the running maximum


def rule_scales():
    for rule, fields in RULES.items():
        for scale in DOT_SCALES if fields.get("similarity") == "dot" else COS_SCALES:
            yield rule, scale


RULE_SCALES = list(rule_scales())
# R = 19 crosses Triton's 16-row tiles; C = 3R + 2 = 59 its 16-column tiles (and groups of period R); L = 2.
RULE_SHAPE = (19, 59, 48)


def skip_unsupported(name, module, rules):
    if name == "triton" and rules.scale_slope:
        # The triton pass refuses it (the learnable scale takes its fused pair_losses): say so, then skip.
        rows, cols = make_inputs(1, 2, 3, 16, dtype=torch.float32, device=DEVICE[name], requires_grad=False)
        with pytest.raises(ValueError, match="scale_slope"):
            module.row_statistics(rows, cols, (16,), ((True,),), 20.0, torch.arange(2, device=DEVICE[name]),
                                  Rules(scale_slope=True))
        pytest.skip("the triton pass does not implement rules.scale_slope (its fused pair_losses does)")


# The Triton interpreter runs a tile in ~0.1 s: on the CPU it takes a smaller shape (R = 5, C = 17: two column
# tiles; test_shapes crosses the row tiles), the fixed maximum (20, dot 0.05) for every rule and the running
# maximum (100) for these. On a GPU it runs the whole grid.
INTERPRETER_RULE_SHAPE = (5, 17, 48)
INTERPRETER_RUNNING_MAX = ("plain", "teacher", "hard_negatives-9", "column_statistics",
                           "guided-exclude-penalty-teacher")


def interpreter_skips(name, rule, scale):
    if name != "triton" or not INTERPRETED:
        return False
    return scale in (500.0, 1.0) or (scale == 100.0 and rule not in INTERPRETER_RUNNING_MAX)


@pytest.mark.parametrize(("rule", "scale"), RULE_SCALES, ids=[f"{r}-s{s:g}" for r, s in RULE_SCALES])
@pytest.mark.parametrize("name", BACKENDS)
def test_rules(name, rule, scale):
    """Every rule at a fixed and a running maximum, in the backend's most precise dtype."""
    if interpreter_skips(name, rule, scale):
        pytest.skip("a GPU runs this scale of the Triton grid; the interpreter a subset (INTERPRETER_RUNNING_MAX)")
    module = load(name)
    n_rows, n_cols, n_features = INTERPRETER_RULE_SHAPE if name == "triton" and INTERPRETED else RULE_SHAPE
    rows, cols, positives, rules = make_case(rule, n_rows, n_cols, n_features, seed=3)
    skip_unsupported(name, module, rules)
    dims = dims_of(n_features)
    check_pass(name, module, rows, cols, dims, active_pairs(2, len(dims)), scale, positives, rules,
               full_precision(name))


# Dot at 0.05: at scale 1 its logits reach ~100, and p - p_T (distillation) cancels beyond fp32 (the float32
# reference is as far off; test_low_precision's rule covers such cases).
FLOAT32_SCALES = [(rule, scale) for rule, scale in RULE_SCALES if scale in (20.0, 100.0, 0.05)]


@pytest.mark.parametrize(("rule", "scale"), FLOAT32_SCALES, ids=[f"{r}-s{s:g}" for r, s in FLOAT32_SCALES])
@pytest.mark.parametrize("name", ("torch", "cpp"))
def test_float32_rules(name, rule, scale):
    """float32 inputs (fp32 accumulators) at the fp32 tolerance: 20 is the fixed maximum, 100 the running one."""
    module = load(name)
    n_rows, n_cols, n_features = RULE_SHAPE
    rows, cols, positives, rules = make_case(rule, n_rows, n_cols, n_features, seed=4)
    dims = dims_of(n_features)
    check_pass(name, module, rows, cols, dims, active_pairs(2, len(dims)), scale, positives, rules, torch.float32)


# (R, C, D): R = 1, C = 1; tiny; D = 64 with dims multiples of 16 (Triton's aligned loops); a square R = C
# (query_to_query); R, C across Triton's 16 x 16 tiles; R = 130 > cpp's kRowBlock (128) and C = 600 > its
# largest column tile (512). L = 3 with an inactive pair.
SHAPES = [(1, 1, 48), (1, 7, 48), (3, 9, 100), (5, 21, 64), (17, 35, 48), (37, 37, 100), (37, 79, 48),
          (130, 600, 48)]
INTERPRETER_MAX_PAIRS = 17 * 35  # larger shapes take 10 s and more under the Triton interpreter
SHAPE_RULES = ("plain", "guided-exclude-penalty-teacher", "triangle-exclude-column_statistics")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}-C{}-D{}".format(*s))
@pytest.mark.parametrize("rule", SHAPE_RULES)
@pytest.mark.parametrize("name", BACKENDS)
def test_shapes(monkeypatch, name, rule, shape):
    """Odd shapes across each backend's blocks: torch in chunks of about 8 rows (triangles of 16), cpp across its
    row blocks and column tiles, Triton across its tiles. The backend's most precise dtype at scale 20."""
    module = load(name)
    n_rows, n_cols, n_features = shape
    if name == "triton" and INTERPRETED and (n_rows * n_cols > INTERPRETER_MAX_PAIRS
                                             or (n_rows * n_cols < INTERPRETER_MAX_PAIRS and rule != "plain")):
        pytest.skip("too slow under the Triton interpreter (runs on a GPU): the largest shape it takes runs "
                    "every rule set, the smaller ones the plain rules")
    if name == "torch":
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", 8 * n_cols * (3 + 4 + 6))
        monkeypatch.setattr(module, "MIN_TRIANGLE_CHUNK", 16)
        monkeypatch.setattr(module, "TRIANGLE_CHUNKS", 16)
    rows, cols, positives, rules = make_case(rule, n_rows, n_cols, n_features, n_layers=3, seed=n_rows + n_cols)
    dims = dims_of(n_features)
    check_pass(name, module, rows, cols, dims, active_pairs(3, len(dims)), 20.0, positives, rules,
               full_precision(name), seed=n_rows)


LOW_PRECISION_RULES = ("plain", "hard_negatives-9", "guided-exclude-penalty-teacher", "triangle-column_statistics")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rule", LOW_PRECISION_RULES)
@pytest.mark.parametrize("name", BACKENDS)
def test_low_precision(name, rule, dtype):
    """bf16/fp16 inputs: every statistic and gradient at most twice as far from the float64 truth (of the rounded
    inputs) as the reference pass computed in that dtype, plus a floor of 1e-3 of the largest entry."""
    if name == "triton" and INTERPRETED and rule not in ("plain", "triangle-column_statistics"):
        pytest.skip("a GPU runs these rules in low precision; the Triton interpreter plain and shared tiles")
    module = load(name)
    device = DEVICE[name]
    n_rows, n_cols = (17, 35) if name == "triton" and INTERPRETED else (37, 79)
    rows64, cols64, positives, rules = make_case(rule, n_rows, n_cols, 48, seed=7)
    rows, cols = rows64.to(dtype), cols64.to(dtype)
    rows64, cols64 = rows.double(), cols.double()
    dims, scale = dims_of(48), 20.0
    active = active_pairs(2, len(dims))
    truth = reference.row_statistics(rows64, cols64, dims, active, scale, positives, rules)
    low = reference.row_statistics(rows, cols, dims, active, scale, positives, rules)
    got = module.row_statistics(rows.to(device), cols.to(device), dims, active, scale, positives.to(device),
                                on_device(rules, device))
    coef, distill = coefficients(rules, 2, len(dims), seed=8)
    want = reference.pass_gradients(rows64, cols64, dims, active, scale, positives, truth.rows, coef, rules, distill,
                                    truth.columns)
    # The reference in low precision: its logits and gradients in `dtype`, given the float64 statistics.
    low_grads = reference.pass_gradients(rows, cols, dims, active, scale, positives, truth.rows, coef, rules, distill,
                                         truth.columns)
    like = got.rows.offset
    have = module.pass_gradients(rows.to(device), cols.to(device), dims, active, scale, positives.to(device),
                                 cast_softmax(truth.rows, like, device), coef.to(device=device, dtype=like.dtype),
                                 on_device(rules, device),
                                 None if distill is None else distill.to(device=device, dtype=like.dtype),
                                 cast_softmax(truth.columns, like, device))

    def lse(softmax):  # active pairs only (an inactive pair's statistics are only finite)
        value = softmax.offset.double().cpu() + softmax.log_sum.double().cpu()
        on = torch.tensor(active)[:, None, :].expand_as(value)
        return torch.where(torch.isfinite(value) & on, value, 0.0)

    compared = [("rows' log-sum-exp", lse(got.rows), lse(low.rows), lse(truth.rows)),
                ("positive logit", got.positive_logit, low.positive_logit, truth.positive_logit),
                ("d rows", have.rows, low_grads.rows, want.rows), ("d cols", have.cols, low_grads.cols, want.cols)]
    if rules.column_statistics:
        compared.append(("columns' log-sum-exp", lse(got.columns), lse(low.columns), lse(truth.columns)))
    for label, g, r, t in compared:
        g, r = g.double().cpu(), r.double().cpu()
        assert torch.isfinite(g).all(), label
        error, reference_error = (g - t).abs().max().item(), (r - t).abs().max().item()
        floor = 1e-3 * t.abs().max().item() + 1e-6
        assert error <= 2 * reference_error + floor, (
            f"{label}: error {error:.3g} > 2 x reference's {reference_error:.3g} + {floor:.1g}")
    # The -inf of a row with nothing kept are where the truth's are.
    on = torch.tensor(active)[:, None, :].expand_as(truth.rows.offset)
    assert torch.equal(torch.isneginf(got.rows.log_sum.cpu())[on], torch.isneginf(truth.rows.log_sum)[on])


# A positive in an excluded column (the row's own group, or on/below the triangle's diagonal): z = -inf, so the
# contract's positive logit is -inf and the positive term has no gradient (the reference's masked_fill). The
# composer never builds such a pass (its excluded passes have no positives), but a backend must still agree.
@pytest.mark.parametrize("rule", ["exclude_own_group", "triangle"])
@pytest.mark.parametrize("name", BACKENDS)
def test_a_positive_in_an_excluded_column(name, rule):
    module = load(name)
    rows, cols, _, rules = make_case(rule, 5, 11, 48, n_layers=1, seed=9)
    # Row 0: a positive kept (column 2 / column 1); rows 1-4: in the own group (column i), or on / below the
    # diagonal (columns i, i - 1).
    positives = torch.tensor([2 if rule == "exclude_own_group" else 1, 1, 2, 2, 3])
    dims = dims_of(48)
    check_pass(name, module, rows, cols, dims, active_pairs(1, len(dims)), 20.0, positives, rules,
               full_precision(name))
