"""``nn.Module`` wrapper around :func:`m2d_kernels.matryoshka_2d_infonce`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from m2d_kernels.functional import matryoshka_2d_infonce, validate_dims

WeightsLike = torch.Tensor | Sequence[Sequence[float]] | Callable[[], torch.Tensor] | None


class Matryoshka2dInfoNCELoss(nn.Module):
    """Fused 2D Matryoshka InfoNCE over all (layer, dim) pairs.

    Args:
        dims: strictly increasing nested truncation sizes.
        weights: ``[L, M]`` pair weights, or a callable returning them, called once per
            forward (e.g. ``lambda: schedules.sampled(L, M, 1, 1)`` for a fresh sub-grid
            every step). None means all ones.
        scale, symmetric, backend, gather_across_devices: as in :func:`matryoshka_2d_infonce`
            (``gather_across_devices=True`` or ``"all_gather"``: cross-device negatives under
            torch.distributed; ``"ring"``: the same by a ring exchange, memory independent of ``W``).
        **options: the loss-family options of :func:`matryoshka_2d_infonce` that do not change
            per step (``directions``, ``partition_mode``, ``similarity``, ``hardness_mode``,
            ``hardness_strength``, ``guide_margin``, ``guide_margin_strategy``, ``guide_exclude_self``,
            ``distill_weights``).

    ``forward(queries [L, B, D], docs [L, N, D], positive_index=None, reduction="sum", guide=None)``:
    ``guide`` is the step's ``(guide_queries, guide_docs)`` when guided filtering is on.
    """

    OPTIONS = ("directions", "partition_mode", "similarity", "hardness_mode", "hardness_strength", "guide_margin",
               "guide_margin_strategy", "guide_exclude_self", "distill_weights")

    def __init__(self, dims: Sequence[int], weights: WeightsLike = None, scale: float = 20.0,
                 symmetric: bool = False, backend: str = "auto", gather_across_devices: bool | str = False,
                 **options) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise TypeError(f"Matryoshka2dInfoNCELoss got unknown options {unknown}; options are {self.OPTIONS}")
        super().__init__()
        self.options = options
        self.dims = validate_dims(dims)  # at construction, not at the first call
        self.weights = weights
        self.scale = scale
        self.symmetric = symmetric
        self.backend = backend
        self.gather_across_devices = gather_across_devices

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, positive_index: torch.Tensor | None = None,
                reduction: str = "sum", guide: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        weights = self.weights() if callable(self.weights) else self.weights
        return matryoshka_2d_infonce(
            queries, docs, self.dims, weights, scale=self.scale, positive_index=positive_index,
            symmetric=self.symmetric, reduction=reduction, backend=self.backend,
            gather_across_devices=self.gather_across_devices, guide=guide, **self.options,
        )

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, scale={self.scale}, symmetric={self.symmetric}, backend={self.backend!r}, "
                f"gather_across_devices={self.gather_across_devices}"
                + "".join(f", {name}={value!r}" for name, value in self.options.items()))
