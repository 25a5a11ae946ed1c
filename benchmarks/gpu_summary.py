"""Summarise a GPU benchmark JSON against the triton issue's targets, with the run's metadata.

    python benchmarks/gpu_summary.py benchmarks/results/gpu-<stamp>/bench.json --tests-rc 0 \
        -o benchmarks/results/gpu-<stamp>/summary.json

Targets (one H100, bf16): worked example forward+backward <= 10 ms, >= 10x faster than
``reference``, >= 3x faster than ``reference-compile``, < 100 MB beyond inputs and
gradients; single pair faster than Inf-CL with no more memory; B=65536 under 1 s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile

MB = 1e6


def _medians(benchmarks):
    table = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        table.setdefault(bench["group"], {})[info["provider"]] = {
            "median_ms": bench["stats"]["median"] * 1e3,
            "tflops": info.get("tflops"),
            "peak_extra_mb": info["peak_extra_bytes"] / MB if "peak_extra_bytes" in info else None,
            "beyond_inputs_and_grads_mb": (info["peak_extra_bytes"] - info["grad_bytes"]) / MB
            if "grad_bytes" in info else None,
        }
    return table


def _targets(table):
    worked, single, big = table.get("worked", {}), table.get("single", {}), table.get("b65536", {})
    checks = {}
    if "triton" in worked:
        triton = worked["triton"]
        checks["worked_at_most_10ms"] = triton["median_ms"] <= 10.0
        checks["worked_under_100MB_beyond_inputs_and_grads"] = triton["beyond_inputs_and_grads_mb"] < 100
        for baseline, factor in (("reference", 10), ("reference-compile", 3)):
            if baseline in worked:
                speedup = worked[baseline]["median_ms"] / triton["median_ms"]
                checks[f"worked_speedup_vs_{baseline}"] = round(speedup, 2)
                checks[f"worked_at_least_{factor}x_vs_{baseline}"] = speedup >= factor
    if "triton" in single and "inf-cl" in single:
        checks["single_faster_than_inf_cl"] = single["triton"]["median_ms"] < single["inf-cl"]["median_ms"]
        memory = single["triton"]["peak_extra_mb"], single["inf-cl"]["peak_extra_mb"]
        checks["single_no_more_memory_than_inf_cl"] = memory[0] <= memory[1]
    if "triton" in big:
        checks["b65536_under_1s"] = big["triton"]["median_ms"] < 1000
    return checks


def _write_atomically(path, payload):
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as tmp:
        json.dump(payload, tmp, indent=2)
    os.replace(tmp.name, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON of benchmarks/test_bench_gpu.py")
    parser.add_argument("--tests-rc", type=int, required=True, help="exit status of the GPU test run")
    parser.add_argument("-o", "--output", required=True, help="summary JSON to write")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    import torch
    import triton

    table = _medians(data["benchmarks"])
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "gpu_tests_exit_status": args.tests_rc,
        "results": table,
        "targets": _targets(table),
    }
    _write_atomically(args.output, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
