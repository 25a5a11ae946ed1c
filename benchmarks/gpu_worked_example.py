"""The worked example on one GPU, timed with CUDA events, as one JSON (stage b of benchmarks/gpu.sh).

    python benchmarks/gpu_worked_example.py --json PATH [--repeats N]

L=12, B=N=8192, D=768, dims (32, 64, 128, 256, 512, 768), bf16, query_to_doc only, every pair weighted 1.
Timed separately, each as warm-up steps then ``--repeats`` timed ones (all samples and their median): the
triton forward, its backward (``loss.backward(retain_graph=True)`` of one forward), forward+backward, a
bf16 ``torch.mm`` for scale, the eager ``reference`` backend and ``torch.compile`` of the reference's pair
losses (forward+backward each). Peak memory is ``torch.cuda.max_memory_allocated`` during one step minus
what was allocated before it (the inputs). FLOPs: forward ``2*L*B*N*top`` (top = 768), backward 4x that.

The JSON is rewritten after every measurement, most valuable first, so a run stopped by its time limit
keeps what it measured; the one ``torch.compile`` comes last, under COMPILE_LIMIT_S.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

import torch
from memory import peak_extra_bytes  # benchmarks/memory.py, beside this script

L, B, N, D = 12, 8192, 8192, 768
DIMS = (32, 64, 128, 256, 512, 768)
DTYPE = torch.bfloat16
SCALE = 20.0
FORWARD_FLOPS = 2 * L * B * N * DIMS[-1]
FLOPS = {"forward": FORWARD_FLOPS, "backward": 4 * FORWARD_FLOPS, "forward_backward": 5 * FORWARD_FLOPS}
MM_SIZE = 8192
WARMUP = 2
COMPILE_LIMIT_S = 50  # Inductor on the 72 pairs; past this the compile is recorded as too slow


def _inputs():
    generator = torch.Generator(device="cuda").manual_seed(0)
    queries = torch.randn(L, B, D, device="cuda", dtype=DTYPE, generator=generator)
    docs = torch.randn(L, N, D, device="cuda", dtype=DTYPE, generator=generator)
    docs[:, :B] += queries  # a positive close to its query, as after some training
    return queries.requires_grad_(True), docs.requires_grad_(True)


def _clear_grads(*tensors):
    for tensor in tensors:
        tensor.grad = None


def _timed(step, repeats, before=None):
    """Median and samples (ms) of ``step`` between two CUDA events, after WARMUP untimed calls;
    ``before`` runs untimed ahead of every call."""
    samples = []
    for i in range(WARMUP + repeats):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= WARMUP:
            samples.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(samples), "samples_ms": samples}


def _with_rate(timing, flops):
    return {**timing, "flops": flops, "tflops": flops / (timing["median_ms"] * 1e-3) / 1e12}


def _peak_extra_bytes(step, before):
    """Peak allocation during one ``step`` beyond what was allocated before it (``before`` runs first)."""
    before()
    return peak_extra_bytes(step, torch.device("cuda"))


class _Expired(Exception):
    pass


def _run_within(seconds, fn):
    """``fn()``, interrupted after ``seconds`` (SIGALRM: the main thread): None, or why it stopped."""
    expired = []

    def alarm(signum, frame):
        expired.append(True)
        raise _Expired

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        fn()
        return None
    except Exception as error:  # Dynamo may wrap the alarm's exception in its own
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return f"timeout: over {seconds} s" if expired else f"error: {type(error).__name__}: {first_line}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _public_loss(queries, docs, backend):
    import m2d_kernels as m2d

    weights = torch.ones(L, len(DIMS))  # on the host: read without a device copy
    return lambda: m2d.matryoshka_2d_infonce(queries, docs, DIMS, weights, scale=SCALE, backend=backend)


def _triton(queries, docs, repeats, clear):
    """Forward, backward and forward+backward of the triton backend, and its peak memory."""
    loss = _public_loss(queries, docs, "triton")
    started = time.perf_counter()
    loss().backward()  # the first launches compile the kernels (seconds on a cold cache)
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - started
    timings = {"triton_forward": _with_rate(_timed(loss, repeats), FLOPS["forward"]),
               "triton_backward": _with_rate(_backward_only(loss, repeats, clear), FLOPS["backward"])}
    step = lambda: loss().backward()  # noqa: E731
    timings["triton_forward_backward"] = _with_rate(_timed(step, repeats, clear), FLOPS["forward_backward"])
    return timings, _peak_extra_bytes(step, clear), first_step_s


def _backward_only(loss, repeats, clear):
    kept = loss()
    return _timed(lambda: kept.backward(retain_graph=True), repeats, clear)


def _mm(repeats):
    a, b = (torch.randn(MM_SIZE, MM_SIZE, device="cuda", dtype=DTYPE) for _ in range(2))
    return {**_with_rate(_timed(lambda: torch.mm(a, b), repeats), 2 * MM_SIZE**3), "size": MM_SIZE}


def _reference(queries, docs, repeats, clear):
    loss = _public_loss(queries, docs, "reference")
    step = lambda: loss().backward()  # noqa: E731
    return _with_rate(_timed(step, repeats, clear), FLOPS["forward_backward"]), _peak_extra_bytes(step, clear)


def _reference_compiled(queries, docs, repeats, clear):
    """torch.compile of the reference's naive losses (the public function's host-side checks stay eager), as
    benchmarks/test_bench_gpu.py's reference-compile: one compile (the first step, forward and backward)
    within COMPILE_LIMIT_S, then timed; (entry, peak bytes or None)."""
    from m2d_kernels.backends import reference
    from m2d_kernels.objective import Objective

    active = tuple((True,) * len(DIMS) for _ in range(L))
    positives = torch.arange(B, device="cuda")
    compiled = torch.compile(lambda q, k: reference.objective_losses(q, q, k, 0, positives, DIMS, active, SCALE,
                                                                     Objective())[0])
    step = lambda: compiled(queries, docs).sum().backward()  # noqa: E731
    started = time.perf_counter()
    failure = _run_within(COMPILE_LIMIT_S, lambda: (step(), torch.cuda.synchronize()))
    entry = {"compile_s": time.perf_counter() - started, "compile_limit_s": COMPILE_LIMIT_S}
    if failure is not None:
        return {**entry, "failure": failure}, None
    entry.update(_with_rate(_timed(step, repeats, clear), FLOPS["forward_backward"]))
    return entry, _peak_extra_bytes(step, clear)


def measure(path, repeats):
    """Every measurement, most valuable first, into the JSON at ``path`` (rewritten after each)."""
    import triton

    queries, docs = _inputs()
    clear = lambda: _clear_grads(queries, docs)  # noqa: E731
    input_bytes = 2 * queries.numel() * queries.element_size()
    result = {
        "shape": {"L": L, "B": B, "N": N, "D": D, "dims": list(DIMS), "dtype": str(DTYPE),
                  "directions": ["query_to_doc"], "scale": SCALE},
        "device": torch.cuda.get_device_name(),
        "multiprocessors": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "repeats": repeats, "warmup": WARMUP, "flops": FLOPS,
        "input_bytes": input_bytes, "grad_bytes": input_bytes, "timings": {}, "peak_extra_bytes": {},
    }
    timings, peaks = result["timings"], result["peak_extra_bytes"]

    def save(*names):
        for name in names:
            print(f"{name}: {timings[name].get('median_ms', '-')} ms", flush=True)
        with open(f"{path}.tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(f"{path}.tmp", path)

    save()  # the device and versions even if the first launch fails
    triton_timings, peaks["triton"], result["triton_first_step_s"] = _triton(queries, docs, repeats, clear)
    timings.update(triton_timings)
    save(*triton_timings)
    timings["mm_bf16"] = _mm(repeats)
    save("mm_bf16")
    timings["reference_forward_backward"], peaks["reference"] = _reference(queries, docs, repeats, clear)
    save("reference_forward_backward")
    entry, peak = _reference_compiled(queries, docs, repeats, clear)
    timings["reference_compile_forward_backward"] = entry
    if peak is not None:
        peaks["reference_compile"] = peak
    save("reference_compile_forward_backward")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="the JSON to write")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions of each measurement")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not torch.cuda.is_available():
        print("gpu_worked_example.py: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    measure(args.json, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
