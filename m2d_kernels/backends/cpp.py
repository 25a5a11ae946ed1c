"""Backend ``cpp``: the fused prefix-trick kernel in C++ with OpenMP, for CPU tensors.

The math is the one of ``torch_prefix.py`` (and DESIGN.md section 1); the kernels are in
``csrc/m2d_cpu.cpp``. Forward keeps per-row log-sum-exp statistics only; backward
recomputes the similarities tile by tile, so nothing of size ``B x N`` is allocated.
fp32 and fp64 run natively; fp16/bf16 inputs are converted to fp32 on entry and the
gradients converted back.

The extension is taken from an ahead-of-time build (``m2d_kernels._C``, ``M2D_BUILD_EXT=1
pip install --no-build-isolation .``) when present, otherwise compiled on first use with
``torch.utils.cpp_extension.load`` (ninja) into torch's extension cache or ``$M2D_BUILD_DIR``.
The outcome, success or the compiler's error, is cached for the process.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from m2d_kernels.backends.torch_prefix import accumulator_dtype, inverse_prefix_norms

EXTENSION_NAME = "m2d_kernels_cpu"
SOURCE_NAME = "m2d_cpu.cpp"
# Lines of the compiler's output quoted when the build fails.
REASON_LINES = 12


def _source_path() -> Path | None:
    """csrc/m2d_cpu.cpp from a source checkout, or its copy shipped inside the package."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "csrc" / SOURCE_NAME, package / "csrc" / SOURCE_NAME):
        if candidate.is_file():
            return candidate
    return None


def _compile() -> ModuleType:
    from torch.utils import cpp_extension

    source = _source_path()
    if source is None:
        raise RuntimeError(f"the C++ source csrc/{SOURCE_NAME} is missing from this installation")
    build_dir = Path(os.environ.get("M2D_BUILD_DIR") or cpp_extension._get_build_directory(EXTENSION_NAME, False))
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{EXTENSION_NAME}.so"
    if not library.is_file() or library.stat().st_mtime < source.stat().st_mtime:
        print("m2d-kernels: compiling the C++ backend (once, ~1 min)...", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(source)],
        # -march=native is safe here: a JIT build runs on the machine that built it.
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


@functools.cache
def _extension() -> tuple[ModuleType | None, str | None]:
    """The compiled module and None, or None and why it could not be built (tried once per process)."""
    try:
        return importlib.import_module("m2d_kernels._C"), None
    except ImportError:
        pass
    try:
        return _compile(), None
    except Exception as error:  # the compiler's message is the reason a user needs to see
        lines = str(error).strip().splitlines()
        return None, "building the C++ extension failed: " + "\n".join(lines[:REASON_LINES])


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cpu":
        return "cpp backend runs on CPU tensors"
    return _extension()[1]


class Matryoshka2dInfoNCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, docs, dims, active, scale, positive_index, symmetric):
        kernels = _extension()[0]
        dtype = accumulator_dtype(queries.dtype)
        q = queries.detach().to(dtype).contiguous()
        k = docs.detach().to(dtype).contiguous()
        inv_q, norm_grad_q = inverse_prefix_norms(q, dims, dtype)
        inv_k, norm_grad_k = inverse_prefix_norms(k, dims, dtype)
        active_mask = torch.tensor(active, dtype=torch.bool)
        losses, row_lse, col_lse = kernels.forward(
            q, k, inv_q, inv_k, positive_index.contiguous(), list(dims), active_mask, scale, symmetric,
            torch.get_num_threads(),
        )
        ctx.save_for_backward(q, k, positive_index, inv_q, norm_grad_q, inv_k, norm_grad_k, row_lse, col_lse)
        ctx.config = (dims, active_mask, scale, symmetric, queries.dtype)
        return losses.to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_losses):
        q, k, positive_index, inv_q, norm_grad_q, inv_k, norm_grad_k, row_lse, col_lse = ctx.saved_tensors
        dims, active_mask, scale, symmetric, input_dtype = ctx.config
        n_queries = q.shape[1]
        # d pair-loss / d cos = coef * (P - onehot); each direction counts half when symmetric.
        coef = (grad_losses.to(q.dtype) * (scale / n_queries / (2 if symmetric else 1))).contiguous()
        grad_q, grad_k = _extension()[0].backward(
            q, k, inv_q, inv_k, norm_grad_q, norm_grad_k, positive_index, list(dims), active_mask, scale,
            symmetric, row_lse, col_lse, coef, torch.get_num_threads(),
        )
        return grad_q.to(input_dtype), grad_k.to(input_dtype), None, None, None, None, None


def pair_losses(
    queries: torch.Tensor,
    docs: torch.Tensor,
    dims: tuple[int, ...],
    active: tuple[tuple[bool, ...], ...],
    scale: float,
    positive_index: torch.Tensor,
    symmetric: bool,
) -> torch.Tensor:
    """Per-pair InfoNCE losses ``[L, M]`` (0 where a pair is inactive), in the input dtype."""
    return Matryoshka2dInfoNCEFunction.apply(queries, docs, dims, active, scale, positive_index, symmetric)
