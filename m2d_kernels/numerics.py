"""Numerics every backend shares: accumulator dtypes, prefix norms, the fixed-maximum rule, positive
logits, constant device tables and the first-order-only guard. It sits below the backends (it imports
none of them), so that no backend borrows another's internals.
"""

from __future__ import annotations

import functools

import torch

EPS = 1e-12  # F.normalize's default: a prefix norm is clamped to at least this

# The fixed maximum: because |cos| <= 1, every logit is at most max_logit = scale (+ a penalty strength),
# so log sum_j exp(z_j) = max_logit + log sum_j exp(z_j - max_logit) needs no running maximum and no
# rescaling. That is exact while the smallest term, exp(-2 * max_logit) (cosine -1), is a normal number of
# the accumulator: down to exp(-87.3) in fp32, exp(-708) in fp64. The spans keep a margin below those.
FIXED_MAX_SPAN = {torch.float32: 80.0, torch.float64: 700.0}

SECOND_DERIVATIVE_ERROR = (
    "m2d-kernels: the fused backends compute first derivatives only; a second derivative (double "
    "backward through a gradient taken with create_graph=True) needs backend='reference'"
)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fixed_max_is_exact(max_logit: float, dtype: torch.dtype) -> bool:
    """Whether ``max_logit`` can serve as every softmax's offset in accumulator ``dtype`` (module comment)."""
    return 2 * max_logit <= FIXED_MAX_SPAN[accumulator_dtype(dtype)]


def segments(dims: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[(d_{m-1}, d_m)]``: the feature columns each dim adds to the previous one (``d_0 = 0``)."""
    return list(zip((0,) + tuple(dims[:-1]), dims))


def inverse_prefix_norms(x: torch.Tensor, dims: tuple[int, ...],
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, R, M]`` tables in ``dtype``: ``rx_m = 1 / max(|x[..., :d_m]|, eps)`` and the norm factor
    of the backward, ``rx_m^2`` where the norm was not clamped, else 0."""
    # vector_norm accumulates in `dtype` without materialising a copy of x in that dtype.
    norms = torch.stack([torch.linalg.vector_norm(x[..., a:b], dim=-1, dtype=dtype) for a, b in segments(dims)], -1)
    norms = norms.square().cumsum(-1).sqrt()
    inverse = 1.0 / norms.clamp_min(EPS)
    return inverse.contiguous(), torch.where(norms >= EPS, inverse.square(), 0.0).contiguous()


def prefix_norms(x: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype, given=None):
    """``inverse_prefix_norms(x, dims, dtype)``, or ``given``, the same two tables computed once by a caller
    that runs several passes over ``x`` (the pass API's ``norms``), in ``dtype``."""
    if given is None:
        return inverse_prefix_norms(x, dims, dtype)
    expected = (x.shape[0], x.shape[1], len(dims))
    if len(given) != 2 or any(tuple(t.shape) != expected for t in given):
        raise ValueError(f"norms: each side must be the two [L, R, M] = {list(expected)} tables of "
                         "inverse_prefix_norms")
    return tuple(t.to(dtype).contiguous() for t in given)


@functools.lru_cache(maxsize=256)
def device_table(values: tuple, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small constant table (pair weights, active flags) on ``device``, copied from the host once per
    value: repeated calls of a training step copy nothing (a host-to-device copy per call stalls the host and
    breaks CUDA-graph capture). Shared: never modify it in place."""
    return torch.tensor(values, device=device, dtype=dtype)


def positive_logits(rows, cols, dims, active, scale, positives) -> torch.Tensor:
    """``[L, R, M]`` ``scale * cos_m(rows_i, cols_{positives_i})`` in the accumulator dtype, 0 where
    ``positives_i == -1`` or the pair is inactive. Differentiable; ``O(L * R * D)``: for the kernels that
    keep a row's positive logit to themselves."""
    acc = accumulator_dtype(rows.dtype)
    x, y = rows.to(acc), cols.index_select(1, positives.clamp_min(0)).to(acc)
    products = torch.stack([(x[..., a:b] * y[..., a:b]).sum(-1) for a, b in segments(dims)], -1).cumsum(-1)
    logits = products * inverse_prefix_norms(x, dims, acc)[0] * inverse_prefix_norms(y, dims, acc)[0] * scale
    keep = (positives >= 0)[None, :, None] & device_table(active, rows.device)[:, None, :]
    return torch.where(keep, logits, 0.0)


class _RefuseSecondDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)


def first_order_only(grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``grad`` as a backward returns it; under ``create_graph=True`` its graph raises a clear error
    when differentiated, so a second derivative is refused instead of silently wrong. ``anchor``
    is the input whose gradient ``grad`` is."""
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _RefuseSecondDerivative.apply(grad, anchor)
    return grad


def positive_logit_gradients(rows, cols, dims, active, scale, positives, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients ``(d_rows [L, R, D], d_cols [L, C, D])``, in the accumulator dtype, of
    ``sum_lm weight[l, m] * sum_i z_lm(i, positives_i)`` (cosine logits, every ``positives_i >= 0``), in the
    closed form the kernels use: ``d z_m / d x[seg_s] = scale rx_m ry_m y - z_m nx_m x`` summed over the dims
    ``m >= s`` that contain the segment, with ``nx_m = rx_m^2`` where the norm was not clamped, else 0 (as
    F.normalize: a clamped norm passes no gradient). ``O(L * R * D)``."""
    acc = accumulator_dtype(rows.dtype)
    x, y = rows.to(acc), cols.index_select(1, positives).to(acc)
    inv_x, norm_x = inverse_prefix_norms(x, dims, acc)
    inv_y, norm_y = inverse_prefix_norms(y, dims, acc)
    products = torch.stack([(x[..., a:b] * y[..., a:b]).sum(-1) for a, b in segments(dims)], -1).cumsum(-1)
    logits = products * inv_x * inv_y * scale
    w = weight.to(acc)[:, None, :] * device_table(active, rows.device, acc)[:, None, :]
    # Suffix sums over the dims: segment s belongs to every dim m >= s.
    def suffix(t):
        return t.flip(-1).cumsum(-1).flip(-1)

    cross = suffix(w * scale * inv_x * inv_y)
    own_x, own_y = suffix(w * logits * norm_x), suffix(w * logits * norm_y)
    d_rows, d_pos = torch.zeros_like(x), torch.zeros_like(y)
    for m, (a, b) in enumerate(segments(dims)):
        d_rows[..., a:b] = cross[..., m, None] * y[..., a:b] - own_x[..., m, None] * x[..., a:b]
        d_pos[..., a:b] = cross[..., m, None] * x[..., a:b] - own_y[..., m, None] * y[..., a:b]
    d_cols = torch.zeros(cols.shape, dtype=acc, device=cols.device).index_add_(1, positives, d_pos)
    return d_rows, d_cols
