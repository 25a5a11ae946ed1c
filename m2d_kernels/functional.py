"""``matryoshka_2d_infonce``: input validation and backend dispatch.

Every input is checked once here, at the boundary; backends receive normalised
arguments (a tuple of dims, an ``[L][M]`` tuple of active flags, a float scale, a long
``positive_index`` on the embeddings' device) and never re-validate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from m2d_kernels import backends
from m2d_kernels.backends.torch_prefix import first_order_only

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("sum", "none")


def matryoshka_2d_infonce(
    queries: torch.Tensor,
    docs: torch.Tensor,
    dims: Sequence[int],
    weights: torch.Tensor | Sequence[Sequence[float]] | None = None,
    *,
    scale: float = 20.0,
    positive_index: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "sum",
    backend: str = "auto",
    check_finite: bool = False,
    gather_across_devices: bool = False,
) -> torch.Tensor:
    """In-batch InfoNCE on truncated, re-normalised embeddings for all (layer, dim) pairs.

    Args:
        queries: ``[L, B, D]`` pooled anchor embeddings, one slice per selected layer
            (not normalised).
        docs: ``[L, N, D]`` candidates of the same layers, ``N >= B``. The positive of
            query ``i`` is ``docs[:, i]`` unless ``positive_index`` says otherwise; the
            other rows are in-batch and hard negatives.
        dims: strictly increasing nested truncation sizes ``d_1 < ... < d_M <= D``.
        weights: ``[L, M]`` non-negative pair weights (default all ones); a zero entry
            means the pair is not computed. A tensor is read once on the host (a CUDA tensor
            costs one copy). A tensor that requires grad (learned pair weights) gets
            ``d total / d weights = `` the pair-loss matrix, so then every pair is computed.
        scale: inverse temperature applied to the cosine similarities (> 0, finite): a number,
            or a one-element tensor. A tensor that requires grad (a learnable temperature,
            e.g. ``logit_scale.exp()``) receives its gradient; its value is read once per call
            (one device sync for a CUDA tensor). Exact up to 1e8 for fp16/bf16/fp32 inputs and
            1e16 for fp64 (README, *Accuracy*).
        positive_index: ``[B]`` long tensor on the embeddings' device, the row of
            ``docs`` holding each query's positive.
        symmetric: also add the doc-to-query direction (the B positives against all
            queries) and average the two directions, as sentence-transformers'
            MultipleNegativesRankingLoss with ``directions=("query_to_doc",
            "doc_to_query")`` and ``partition_mode="per_direction"``.
        reduction: ``"sum"`` returns ``sum_{l,m} weights[l, m] * loss_lm``; ``"none"``
            returns the ``[L, M]`` matrix of unweighted ``loss_lm`` (0 where the weight is 0).
        backend: ``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"`` or ``"reference"``.
        check_finite: raise on NaN/Inf embeddings (costs a device sync). Otherwise NaN
            propagates to the loss.
        gather_across_devices: under ``torch.distributed``, score the local queries
            against the docs of all ranks, gathered with gradient in sentence-transformers'
            layout (for each group of ``B`` docs rows ``[positives, negatives_1, ...]``, the
            groups of all ranks in rank order), so ``N`` must be a multiple of ``B`` and
            equal on all ranks. ``positive_index`` keeps indexing the local docs.
            ``symmetric`` scores the local positives against the queries of all ranks. The
            result is still a mean over the local queries: the sum over ranks is ``W`` times
            the loss of one process on the concatenated batch (see
            :mod:`m2d_kernels.distributed`). Without an initialised process group, or with
            one rank, the computation is local.

    Returns:
        A scalar (``"sum"``) or an ``[L, M]`` tensor (``"none"``) in the input dtype.
    """
    scale_param = scale if isinstance(scale, torch.Tensor) and scale.requires_grad else None
    weights_param = weights if isinstance(weights, torch.Tensor) and weights.requires_grad else None
    dims, weights, scale, positive_index = _validate(
        queries, docs, dims, weights, scale, positive_index, symmetric, reduction, check_finite, gather_across_devices
    )
    # Learned weights need every pair's loss (d total / d weights[l, m] = loss_lm, also where w = 0).
    active = tuple(tuple(weights_param is not None or w > 0 for w in row) for row in weights)
    scale_grad = scale_param is not None and torch.is_grad_enabled()
    impl = backends.resolve(backend, queries.device, queries.dtype)
    if gather_across_devices:
        from m2d_kernels import distributed  # torch.distributed only when asked for: not every build has it

        losses = distributed.pair_losses_across_devices(
            impl, queries, docs, dims, active, scale, positive_index, symmetric, scale_grad=scale_grad
        )
    else:
        losses = impl.pair_losses(queries, docs, dims, active, scale, positive_index, symmetric, scale_grad)
    if scale_grad:
        losses = _ScaleGradient.apply(*losses, scale_param)
    if reduction == "none":
        return losses
    if weights_param is not None:
        return (losses * weights_param.to(device=losses.device, dtype=losses.dtype)).sum()
    return (losses * torch.tensor(weights, device=losses.device, dtype=losses.dtype)).sum()


class _ScaleGradient(torch.autograd.Function):
    """Identity on the pair losses that also hands ``scale`` its gradient,
    ``sum_lm grad_lm * d loss_lm / d scale``, from the slope the backend computed in its forward."""

    @staticmethod
    def forward(ctx, losses, dloss_dscale, scale):
        ctx.save_for_backward(dloss_dscale, scale)
        return losses.clone()

    @staticmethod
    def backward(ctx, grad_losses):
        dloss_dscale, scale = ctx.saved_tensors
        grad_scale = (grad_losses.detach().to(dloss_dscale.dtype) * dloss_dscale).sum()
        # The slope carries no graph: a second derivative with respect to scale must raise, not be wrong.
        grad_scale = first_order_only(grad_scale.to(device=scale.device, dtype=scale.dtype).reshape(scale.shape), scale)
        return grad_losses, None, grad_scale


def _validate(queries, docs, dims, weights, scale, positive_index, symmetric, reduction, check_finite,
              gather_across_devices):
    for name, x in (("queries", queries), ("docs", docs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"{name} must have shape [L, rows, D] (layers, rows, features), got shape {tuple(x.shape)}; "
                "use x.unsqueeze(0) for a single layer"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if docs.dtype != queries.dtype:
        raise TypeError(f"queries and docs must have the same dtype, got {queries.dtype} and {docs.dtype}")
    if docs.device != queries.device:
        raise ValueError(f"queries and docs must be on the same device, got {queries.device} and {docs.device}")
    n_layers, n_queries, n_features = queries.shape
    if docs.shape[0] != n_layers:
        raise ValueError(f"queries and docs must have the same number of layers L, got {n_layers} and {docs.shape[0]}")
    if docs.shape[2] != n_features:
        raise ValueError(f"queries and docs must have the same feature size D, got {n_features} and {docs.shape[2]}")
    if n_layers == 0 or n_queries == 0 or n_features == 0:
        raise ValueError(f"queries must be non-empty, got shape {tuple(queries.shape)}")
    if docs.shape[1] < n_queries:
        raise ValueError(f"docs must have at least as many rows N as queries B, got N={docs.shape[1]} < B={n_queries}")

    if isinstance(dims, torch.Tensor):
        dims = dims.tolist()
    if isinstance(dims, (int, str)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of ints, got {type(dims).__name__}")
    if len(dims) == 0 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    dims = tuple(int(d) for d in dims)
    if dims[0] < 1 or any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"dims must be strictly increasing positive ints, got {dims}")
    if dims[-1] > n_features:
        raise ValueError(f"dims must not exceed the feature size D={n_features}, got {dims}")

    # Weights become a tuple of Python floats: no tensor work, so torch.compile traces it.
    shape = (n_layers, len(dims))
    if weights is None:
        weights = ((1.0,) * len(dims),) * n_layers
    else:
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 2:
                raise ValueError(f"weights must have shape [L, M] = {shape}, got {tuple(weights.shape)}")
            weights = weights.detach().cpu().tolist()  # [L, M] is tiny; a CUDA tensor costs one copy
        try:
            weights = tuple(tuple(float(w) for w in row) for row in weights)
        except (TypeError, ValueError) as error:
            raise TypeError(f"weights must be a tensor or nested sequence of numbers of shape {shape}") from error
        row_lengths = sorted({len(row) for row in weights})
        if len(weights) != n_layers or row_lengths != [len(dims)]:
            raise ValueError(
                f"weights must have shape [L, M] = {shape}, got {len(weights)} rows of lengths {row_lengths}"
            )
        if not all(math.isfinite(w) and w >= 0 for row in weights for w in row):
            raise ValueError(f"weights must be finite and non-negative, got {weights}")

    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise TypeError(f"scale must be a number or a one-element tensor, got a tensor of shape "
                            f"{tuple(scale.shape)}")
        scale = scale.item()
    if not isinstance(scale, Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale}")

    if positive_index is None:
        positive_index = torch.arange(n_queries, device=queries.device)
    else:
        if not isinstance(positive_index, torch.Tensor) or positive_index.dtype != torch.long:
            got = getattr(positive_index, "dtype", type(positive_index).__name__)
            raise TypeError(f"positive_index must be a torch.long tensor, got {got}")
        if tuple(positive_index.shape) != (n_queries,):
            raise ValueError(f"positive_index must have shape [B] = ({n_queries},), got {tuple(positive_index.shape)}")
        positive_index = positive_index.contiguous()  # a column of a stacked index, or an expanded one
        if positive_index.device != queries.device:
            raise ValueError(
                f"positive_index must be on the embeddings' device {queries.device}, got {positive_index.device}"
            )
        if not torch.compiler.is_compiling():  # reading the values syncs; torch.compile cannot trace it
            low, high = positive_index.min().item(), positive_index.max().item()
            if low < 0 or high >= docs.shape[1]:
                raise ValueError(f"positive_index values must be in [0, N={docs.shape[1]}), got range [{low}, {high}]")

    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not isinstance(gather_across_devices, bool):
        raise TypeError(f"gather_across_devices must be a bool, got {type(gather_across_devices).__name__}")
    if gather_across_devices and docs.shape[1] % n_queries != 0:
        raise ValueError(
            f"gather_across_devices needs docs rows N to be a multiple of queries B (groups of B rows: positives, "
            f"then each hard negative column), got N={docs.shape[1]}, B={n_queries}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if check_finite:
        for name, x in (("queries", queries), ("docs", docs)):
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} contains NaN or Inf values")
    return dims, weights, scale, positive_index
