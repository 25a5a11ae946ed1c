"""Forward + backward time of the loss alone, ``auto`` backend against ``reference``,
on the embedding shapes of a training step (what the CLI prints after training).

Timed in interleaved rounds with an explicit torch thread count (:mod:`m2d_kernels.timing`), so that a busy
machine slows both sides alike and says so instead of printing a speed-up that measures the load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from m2d_kernels import backends, timing
from m2d_kernels.functional import matryoshka_2d_infonce


def loss_step(queries_shape: Sequence[int], docs_shape: Sequence[int], dims: Sequence[int], weights: torch.Tensor,
              backend: str, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A callable running one forward + backward of ``matryoshka_2d_infonce`` on random ``queries [L, B, D]``
    and ``docs [L, N, D]`` (synchronising a GPU before it returns, so that its time is the work's)."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(*queries_shape, generator=generator).to(device, dtype).requires_grad_(True)
    docs = torch.randn(*docs_shape, generator=generator).to(device, dtype).requires_grad_(True)

    def step():
        queries.grad = docs.grad = None
        matryoshka_2d_infonce(queries, docs, dims, weights, backend=backend).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def compare_with_reference(queries_shape: Sequence[int], docs_shape: Sequence[int], dims: Sequence[int],
                           weights: torch.Tensor, device: torch.device, repeats: int = 5,
                           threads: int | None = None) -> dict:
    """``auto`` against ``reference`` in ``repeats`` interleaved rounds (after one warm-up each).

    Returns a JSON-ready dict: ``backend`` (the one auto picks), ``auto_ms`` / ``reference_ms`` (medians),
    ``speedup`` (their ratio), ``threads``, ``load_average``, ``timing`` (rounds, spreads) and ``warnings``
    (non-empty when the machine looked busy).
    """
    chosen = backends.chosen_name("auto", device)
    contenders = {
        "auto": loss_step(queries_shape, docs_shape, dims, weights, "auto", device),
        "reference": loss_step(queries_shape, docs_shape, dims, weights, "reference", device),
    }
    result = timing.compare(contenders, rounds=repeats, threads=threads)
    return {"backend": chosen, "device": str(device), "queries_shape": list(queries_shape),
            "docs_shape": list(docs_shape), "dims": list(dims),
            "auto_ms": 1e3 * result.timings["auto"].median, "reference_ms": 1e3 * result.timings["reference"].median,
            "speedup": result.ratio("reference", "auto"), "threads": result.threads,
            "load_average": result.as_dict()["load_average"], "timing": result.as_dict(),
            "warnings": list(result.warnings)}


def format_speed(result: dict) -> str:
    """The summary's lines: medians with their spread, the conditions, and a warning when the machine was busy."""
    spreads = {name: entry["spread"] for name, entry in result["timing"]["timings"].items()}
    loads = result["load_average"]
    load_text = "load average " + " / ".join(f"{x:.2f}" for x in loads) if loads is not None else "load unknown"
    lines = [f"loss forward+backward on queries {tuple(result['queries_shape'])}, docs {tuple(result['docs_shape'])}, "
             f"dims {tuple(result['dims'])} ({result['device']}): auto -> {result['backend']} "
             f"{result['auto_ms']:.2f} ms (spread {100 * spreads['auto']:.0f} %), reference "
             f"{result['reference_ms']:.2f} ms (spread {100 * spreads['reference']:.0f} %), "
             f"speed-up x{result['speedup']:.2f}",
             f"  median of {result['timing']['rounds']} interleaved rounds, {result['threads']} torch thread(s), "
             f"{load_text}"]
    if result["warnings"]:
        lines.append("  warning: the machine looked busy, this speed-up is not reliable: "
                     + "; ".join(result["warnings"]))
    return "\n".join(lines)
