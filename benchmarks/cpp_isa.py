"""What the C++ backend's instruction set is worth on this CPU: its build for each ISA, side by side.

The C++ kernels' products go through PyTorch's BLAS, which picks its own vector width at run time; the
epilogues (logits, exponentials, the softmax sums) are the extension's loops, compiled with the flags of
``m2d_kernels.backends.cpp.build_flags``. ``M2D_ISA`` selects them (each ISA builds into a folder of its
own). Each round runs one child process per ISA, in turn, each timing the public function's forward and
backward (``backend="cpp"``) and ``torch.mm`` on the same FLOPs in the same process; the speed of each ISA is
reported as its median time and as its GFLOP/s over ``torch.mm``'s, a ratio measured side by side that a
busy machine moves less than the times.

    python benchmarks/cpp_isa.py --json benchmarks/results/cpp-isa-<machine>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(7, 256, 512, 384), (7, 1024, 2048, 384)]
DIMS = (32, 64, 128, 256, 384)

CHILD = r"""
import json, statistics, sys, time
import torch
import m2d_kernels as m2d
from m2d_kernels.backends import cpp

shapes, repeats, dims = json.loads(sys.argv[1]), int(sys.argv[2]), tuple(json.loads(sys.argv[3]))
reason = cpp.unavailable_reason(torch.device("cpu"))
if reason is not None:
    raise SystemExit(reason)
out = {"flags": cpp.build_flags()[0], "threads": torch.get_num_threads(), "cases": {}}
torch.manual_seed(0)
for L, B, N, D in shapes:
    queries = torch.randn(L, B, D).requires_grad_()
    docs = torch.randn(L, N, D).requires_grad_()
    flop = 8 * L * B * N * D  # the prefix trick's forward + backward (docs/design.md, "Work and memory")

    def step():
        queries.grad = docs.grad = None
        m2d.matryoshka_2d_infonce(queries, docs, dims, backend="cpp").backward()

    # The same FLOPs as fp32 GEMMs: 4 products of [B, D] x [D, N] per layer.
    a, b = torch.randn(B, D), torch.randn(D, N)

    def gemm():
        for _ in range(4 * L):
            torch.mm(a, b)

    step(); gemm()  # warm-up: the build, allocator, BLAS threads
    times, gemm_times = [], []
    for _ in range(repeats):  # interleaved: both see the same load
        start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
        start = time.perf_counter(); gemm(); gemm_times.append(time.perf_counter() - start)
    t, g = statistics.median(times), statistics.median(gemm_times)
    out["cases"][f"L{L}-B{B}-N{N}-D{D}"] = {"cpp_s": t, "mm_s": g, "cpp_gflops": flop / t / 1e9,
                                            "mm_gflops": flop / g / 1e9, "ratio_to_mm": g / t}
print(json.dumps(out))
"""


def _cpu() -> dict:
    info = {"model": "unknown", "avx512f": False, "avx2": False}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info.update(avx512f="avx512f" in flags, avx2="avx2" in flags)
                break
    except OSError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", action="append", help="ISAs to compare (default: avx2, avx512, native)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    isas = args.isa or ["avx2", "avx512", "native"]
    cpu = _cpu()
    if "avx512" in isas and not cpu["avx512f"]:
        parser.error("--isa avx512: this CPU has no AVX-512F")
    load_before = os.getloadavg()
    rounds = []
    for index in range(args.rounds):
        entry = {}
        for isa in isas:
            env = {**os.environ, "M2D_ISA": isa}
            result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPES), str(args.repeats),
                                     json.dumps(DIMS)], cwd=ROOT, env=env, capture_output=True, text=True,
                                    check=False)
            if result.returncode != 0:
                raise SystemExit(f"M2D_ISA={isa} failed:\n{result.stderr[-3000:]}")
            entry[isa] = json.loads(result.stdout.strip().splitlines()[-1])
        entry["load_average"] = os.getloadavg()
        rounds.append(entry)
        print(f"round {index + 1}/{args.rounds}: load {entry['load_average'][0]:.2f}", flush=True)
    rows = []
    for case in rounds[0][isas[0]]["cases"]:
        row = {"case": case}
        for isa in isas:
            values = [r[isa]["cases"][case] for r in rounds]
            row[isa] = {"cpp_ms": statistics.median(1e3 * v["cpp_s"] for v in values),
                        "cpp_gflops": statistics.median(v["cpp_gflops"] for v in values),
                        "mm_gflops": statistics.median(v["mm_gflops"] for v in values),
                        "ratio_to_mm": statistics.median(v["ratio_to_mm"] for v in values),
                        "ratio_to_mm_range": [min(v["ratio_to_mm"] for v in values),
                                              max(v["ratio_to_mm"] for v in values)]}
        base = row[isas[0]]["cpp_ms"]
        for isa in isas:
            row[isa]["speedup_over_" + isas[0]] = base / row[isa]["cpp_ms"]
        rows.append(row)
    print(f"{'case':<22} " + " ".join(f"{isa + ' ms':>12} {isa + '/mm':>11}" for isa in isas))
    for row in rows:
        print(f"{row['case']:<22} " + " ".join(f"{row[isa]['cpp_ms']:>12.1f} {row[isa]['ratio_to_mm']:>11.2f}"
                                               for isa in isas))
    if args.json:
        from m2d_kernels._files import atomic_write

        record = {"command": "python benchmarks/cpp_isa.py " + " ".join(sys.argv[1:]), "cpu": cpu,
                  "cores": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
                  "flags": {isa: rounds[0][isa]["flags"] for isa in isas}, "rows": rows, "raw_rounds": rounds}
        text = (json.dumps(record, indent=1) + "\n").encode()
        atomic_write(args.json, lambda file: file.write(text))


if __name__ == "__main__":
    main()
