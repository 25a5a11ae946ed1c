"""Backend registry.

Each backend is one module exposing::

    unavailable_reason(device: torch.device) -> str | None   # None when it can run there
    pair_losses(queries, docs, dims, active, scale, positive_index, symmetric) -> Tensor[L, M]

``pair_losses`` returns the unweighted per-(layer, dim) losses (0 where ``active`` is
False), differentiable with respect to ``queries`` and ``docs``; the weights reach the
kernels' backward as the incoming gradient of that matrix. Modules are imported lazily so
that ``import m2d_kernels`` needs neither Triton nor a compiler.

The pass API (DESIGN.md section 6): ``rows [L, R, D]`` scored against one block of
``cols [L, C, D]``, autograd-free, with the backend's own kernels, so that a softmax over
several blocks (the ring exchange of ``m2d_kernels.distributed``) is the combination of
per-block statistics::

    row_statistics(rows, cols, dims, active, scale, positives, rules=PLAIN, norms=None)
        -> offset, log_sum, positive_logit                        # each [L, R, M]
           (+ teacher_sum with rules.teacher)
           (+ col_offset, col_log_sum [L, K, M] with rules.column_statistics = K)
    pass_gradients(rows, cols, dims, active, scale, positives, offset, log_sum, coef,
                   rules=PLAIN, distill_coef=None, col_offset=None, col_log_sum=None, norms=None)
        -> d_rows [L, R, D], d_cols [L, C, D]

``norms`` (optional, cosine): ``(row_tables, col_tables)``, each the two ``[L, R, M]`` tables of
``torch_prefix.inverse_prefix_norms`` for those rows / columns, so that a caller running several passes
over the same tensors computes them once; a fused backend converts them to its dtype, the reference
(an independent oracle) recomputes its own.

``rules`` (:class:`m2d_kernels.rules.Rules`, whose docstring is the specification) select the
similarity, the excluded columns, a hardness penalty and the teacher sums of score distillation;
excluded columns are dropped before the exponentials, a row with none left has ``log_sum = -inf``.
``teacher_sum = sum_j exp(z_T - offset_T) z_lm`` with the teacher pair (L - 1, M - 1) and its
returned offset; ``pass_gradients`` then also differentiates ``distill_coef[l, m] * sum_i [LSE_i -
sum_j p_T(i, j) z_ij]``. :mod:`m2d_kernels.objective` composes passes into the loss family.

``positives [R]`` (long) is the column of this block holding row ``i``'s positive, or -1
when it lies in another block. ``offset`` and ``log_sum`` are per row and pair, natural-log
units: ``log sum_j exp(z_ij - offset_i)`` over this block's columns, ``z = scale * cos``,
relative to the offset (the row maximum, or ``scale`` where the backend uses a fixed
maximum); ``positive_logit`` is ``z_i,positives_i`` (0 for -1). Two blocks combine as
``o = max(o1, o2)``, ``log_sum = logaddexp(l1 + o1 - o, l2 + o2 - o)``; a row's loss is
``offset + log_sum - positive_logit``. ``pass_gradients`` returns the gradients, from this
block's columns, of ``sum_lm coef[l, m] * sum_i (LSE_i - z_i,positives_i)`` where the softmax
behind ``LSE`` has the given (combined) statistics, so summing it over the blocks gives the
gradient of the whole softmax (``coef [L, M]`` per row loss: ``d total / d loss_lm / R`` for
a mean over rows). With ``rules.column_statistics = K`` the first K columns are softmaxes of their
own over the rows (``rules.triangle`` / ``column_statistics``: the shared tiles of the joint
directions): the forward returns their statistics and ``pass_gradients`` adds the gradient of
``sum_lm coef[l, m] * sum_{j < K} LSE_col_j`` with the given (combined) column statistics.
Backends that implement these two rules set ``SHARED_TILES = True`` (or define
``shares_tiles(similarity, scale) -> bool`` when it depends on them); the others get one pass per
direction from :mod:`m2d_kernels.objective`. Inactive pairs have finite statistics and no gradient. Gradients are in
the accumulator dtype where the backend computes them unrounded (torch, cpp), else in the
input dtype (triton; reference: the input dtype, which is its accumulator).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

# name -> module.
_MODULES = {
    "triton": "m2d_kernels.backends.triton_kernels",
    "cpp": "m2d_kernels.backends.cpp",
    "torch": "m2d_kernels.backends.torch_prefix",
    "reference": "m2d_kernels.backends.reference",
}
# "auto" takes the first backend of its device type's list that can run; "torch" runs anywhere.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
BACKEND_NAMES = tuple(_MODULES) + ("auto",)
# The device type an accelerated backend is built for: "auto" warns once per backend when it
# cannot run there (e.g. the C++ build failed) instead of falling back silently.
_NATIVE_DEVICE_TYPE = {"triton": "cuda", "cpp": "cpu"}
_warned_fallbacks: set[str] = set()
_loaded: dict[str, ModuleType] = {}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        _loaded[name] = importlib.import_module(_MODULES[name])
        return _loaded[name], None
    except ImportError as error:  # an optional dependency (Triton, a compiler) is missing
        return None, f"{type(error).__name__}: {error}"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    module, reason = _load(name)
    return reason if module is None else module.unavailable_reason(device)


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> ModuleType:
    """The backend module for ``name``; "auto" picks the first of ``AUTO_ORDER[device.type]``
    that can run on ``device`` and supports ``dtype`` (a module's ``SUPPORTED_DTYPES``)."""
    return _loaded[chosen_name(name, device, dtype)]


def chosen_name(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that ``name`` ("auto" or a backend name) stands for on ``device``."""
    return _choose(name, str(device), str(dtype).removeprefix("torch."))


# Under torch.compile the choice (imports, availability probes) runs eagerly at trace time
# and enters the graph as a constant, so dispatch causes no graph break.
@torch.compiler.assume_constant_result
def _choose(name: str, device_name: str, dtype_name: str) -> str:
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    for candidate in AUTO_ORDER.get(device.type, ("torch",)) if name == "auto" else (name,):
        reason = unavailable_reason(candidate, device)
        if reason is None:
            if name == "auto" and dtype not in getattr(_loaded[candidate], "SUPPORTED_DTYPES", (dtype,)):
                continue
            return candidate
        if name != "auto":
            raise RuntimeError(f"backend {name!r} is not available on {device}: {reason}")
        if _NATIVE_DEVICE_TYPE.get(candidate) == device.type and candidate not in _warned_fallbacks:
            _warned_fallbacks.add(candidate)
            warnings.warn(f"m2d-kernels: backend {candidate!r} is unavailable, falling back: {reason}", stacklevel=4)
    raise RuntimeError(f"no backend can run on {device}")  # unreachable: "torch" runs anywhere


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _probe(name: str, device: torch.device) -> str | None:
    """Why ``name`` can neither run nor be built for ``device``, without building it (a module's ``probe``)."""
    module, reason = _load(name)
    if module is None:
        return reason
    return module.probe(device) if hasattr(module, "probe") else module.unavailable_reason(device)


def available_backends() -> list[str]:
    """Backends that can run here, on the CPU or on this machine's GPU, or that are built on their first call.

    Builds nothing: ``cpp`` is listed when its extension is built or can be (source, ninja and a compiler are
    here); :func:`backend_status` tells which, and the first ``cpp`` call then pays for the compile.
    """
    return [name for name in _MODULES if any(_probe(name, device) is None for device in _devices())]


def backend_status() -> dict[str, str]:
    """Name -> ``"ready"``, ``"buildable: <how>"`` (``cpp`` before its first call compiles it) or
    ``"unavailable: <reason>"``, for every backend, without building anything."""
    status = {}
    for name in _MODULES:
        reasons = [_probe(name, device) for device in _devices()]
        if any(reason is None for reason in reasons):
            if hasattr(_loaded[name], "build_status"):  # compiled on first use (cpp): say whether it is built yet
                state, detail = _loaded[name].build_status()
                status[name] = "ready" if state == "ready" else f"{state}: {detail}"
            else:
                status[name] = "ready"
        else:
            status[name] = f"unavailable: {reasons[0]}"
    return status
