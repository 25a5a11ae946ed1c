"""Forward + backward time of the loss alone, ``auto`` backend against ``reference``,
on the embedding shapes of a training step (what the CLI prints after training)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from m2d_kernels import backends
from m2d_kernels.functional import matryoshka_2d_infonce


def time_loss(queries_shape: Sequence[int], docs_shape: Sequence[int], dims: Sequence[int], weights: torch.Tensor,
              backend: str, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5,
              seed: int = 0) -> float:
    """Median seconds of one forward + backward of ``matryoshka_2d_infonce`` (after a warm-up call)."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(*queries_shape, generator=generator).to(device, dtype).requires_grad_(True)
    docs = torch.randn(*docs_shape, generator=generator).to(device, dtype).requires_grad_(True)
    times = []
    for attempt in range(repeats + 1):
        queries.grad = docs.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        matryoshka_2d_infonce(queries, docs, dims, weights, backend=backend).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first call pays for compilation / lazy imports
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_with_reference(queries_shape: Sequence[int], docs_shape: Sequence[int], dims: Sequence[int],
                           weights: torch.Tensor, device: torch.device, repeats: int = 5) -> dict:
    """``{"backend": name auto picks, "auto_ms": ..., "reference_ms": ..., "speedup": ...}``."""
    chosen = backends.chosen_name("auto", device)
    auto = time_loss(queries_shape, docs_shape, dims, weights, "auto", device, repeats=repeats)
    reference = time_loss(queries_shape, docs_shape, dims, weights, "reference", device, repeats=repeats)
    return {"backend": chosen, "device": str(device), "queries_shape": list(queries_shape),
            "docs_shape": list(docs_shape), "dims": list(dims), "auto_ms": 1e3 * auto,
            "reference_ms": 1e3 * reference, "speedup": reference / auto}


def format_speed(result: dict) -> str:
    return (f"loss forward+backward on queries {tuple(result['queries_shape'])}, docs {tuple(result['docs_shape'])}, "
            f"dims {tuple(result['dims'])} ({result['device']}): auto -> {result['backend']} "
            f"{result['auto_ms']:.2f} ms, reference {result['reference_ms']:.2f} ms, "
            f"speed-up x{result['speedup']:.2f}")
