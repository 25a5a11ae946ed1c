"""Backend registry.

Each backend is one module implementing the contract of :mod:`m2d_kernels.backends.base` (one pass of rows
against a block of columns: ``row_statistics`` and ``pass_gradients``, with named results), plus
``unavailable_reason(device)``, ``shares_tiles(similarity, scale)`` and ``SUPPORTED_DTYPES``:

    reference   the naive per-pair computation, sentence-transformers' code shape: the oracle
    torch       the prefix trick in plain PyTorch, chunked over rows: any device
    cpp         the prefix trick in C++ with OpenMP: CPU tensors
    triton      the prefix trick in Triton: CUDA tensors; it also keeps fused kernels for the default
                options (``pair_losses``), until its kernels move onto the contract

Modules are imported lazily so that ``import m2d_kernels`` needs neither Triton nor a compiler.
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
