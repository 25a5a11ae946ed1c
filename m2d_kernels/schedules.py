"""(layer, dim) weight matrices ``[L, M]`` for ``matryoshka_2d_infonce``.

Rows are the *selected* layers in the order they are stacked in ``queries``/``docs``;
columns are the nested dims. A zero entry means the pair is not computed that step.
All schedules return float32 CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def full_grid(n_layers: int, n_dims: int) -> torch.Tensor:
    """Every (layer, dim) pair with weight 1: ``[n_layers, n_dims]`` ones."""
    _check_count("n_layers", n_layers)
    _check_count("n_dims", n_dims)
    return torch.ones(n_layers, n_dims)


def starbucks(layers: Sequence[int], dims: Sequence[int], pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Ones on the listed ``(layer, dim)`` pairs, as in Starbucks (Zhuang et al., 2024).

    ``layers`` and ``dims`` name the rows and columns (e.g. ``layers=[2, 4, 6]`` for the
    hidden states stacked in that order, ``dims=[32, 64, 128]``); ``pairs`` are given by
    those names, e.g. ``[(2, 32), (4, 64), (6, 128)]``.
    """
    layers, dims = list(layers), list(dims)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct layer ids, got {layers}")
    if not dims or len(set(dims)) != len(dims):
        raise ValueError(f"dims must be a non-empty list of distinct dims, got {dims}")
    weights = torch.zeros(len(layers), len(dims))
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in layers or pair[1] not in dims:
            raise ValueError(f"pairs must be (layer, dim) with layer in {layers} and dim in {dims}, got {pair!r}")
        weights[layers.index(pair[0]), dims.index(pair[1])] = 1.0
    if not pairs:
        raise ValueError("pairs must list at least one (layer, dim) pair")
    return weights


def sampled(
    n_layers: int,
    n_dims: int,
    n_layers_per_step: int,
    n_dims_per_step: int,
    generator: torch.Generator | None = None,
    *,
    always_include_last_layer: bool = False,
) -> torch.Tensor:
    """A random sub-grid for one step: ``n_layers_per_step`` layers, and for each of them
    independently ``n_dims_per_step`` dims, with weight 1 (-1 means all).

    With ``always_include_last_layer`` the last layer is always selected and
    ``n_layers_per_step`` more are drawn from the others (sentence-transformers'
    ``AdaptiveLayerLoss`` convention).
    """
    _check_count("n_layers", n_layers)
    _check_count("n_dims", n_dims)
    candidates = n_layers - 1 if always_include_last_layer else n_layers
    limits = (("n_layers_per_step", n_layers_per_step, candidates), ("n_dims_per_step", n_dims_per_step, n_dims))
    for name, value, limit in limits:
        if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or 0 <= value <= limit):
            raise ValueError(f"{name} must be -1 (all) or an int in [0, {limit}], got {value!r}")
    n_layers_per_step = candidates if n_layers_per_step == -1 else n_layers_per_step
    n_dims_per_step = n_dims if n_dims_per_step == -1 else n_dims_per_step
    layers = torch.randperm(candidates, generator=generator)[:n_layers_per_step].tolist()
    if always_include_last_layer:
        layers.append(n_layers - 1)
    weights = torch.zeros(n_layers, n_dims)
    for layer in sorted(layers):
        weights[layer, torch.randperm(n_dims, generator=generator)[:n_dims_per_step]] = 1.0
    return weights
