"""What the ``cpp`` build's instruction set is worth on this CPU: each ISA of ``M2D_ISA`` (``cpp.ISA_FLAGS``) the
CPU has, each timed against ``torch.mm`` side by side (docs/benchmarks.md, "What a user on each CPU gets").

    python benchmarks/isa_builds.py --runs 3 --build-dir <folder>     (from a checkout: PYTHONPATH=$PWD)

Each build compiles once into ``--build-dir`` (about 45 s of CPU time each). The builds run in fresh processes,
alternating (avx2, avx512, native, avx2, ...), each timing ``cpp`` forward+backward and the
``torch.mm`` products of the same shape in interleaved rounds; the printed ratio ``cpp / torch.mm`` is the
figure to compare (the absolute medians follow the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# The ISAs compared (M2D_ISA), those the CPU lacks left out.
ISAS = ("avx2", "avx512", "native")
SHAPE = (7, 1024, 2048, 384)
DIMS = (32, 64, 128, 256, 384)


def child(rounds: int, threads: int) -> dict:
    import torch

    import m2d_kernels as m2d
    from m2d_kernels import timing
    from m2d_kernels.backends import cpp
    n_layers, n_queries, n_docs, n_features = SHAPE
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(n_layers, n_queries, n_features, generator=generator).requires_grad_()
    docs = torch.randn(n_layers, n_docs, n_features, generator=generator).requires_grad_()
    left = torch.randn(n_layers, n_queries, n_features, generator=generator)
    right = torch.randn(n_layers, n_features, n_docs, generator=generator)
    out = torch.empty(n_queries, n_docs)

    def step():
        queries.grad = docs.grad = None
        m2d.matryoshka_2d_infonce(queries, docs, DIMS, backend="cpp").backward()

    def products():
        for layer in range(n_layers):
            torch.mm(left[layer], right[layer], out=out)

    result = timing.compare({"cpp": step, "torch.mm": products}, rounds=rounds, threads=threads)
    return {"flags": cpp.build_flags()[0], "cpp_ms": 1e3 * result.timings["cpp"].median,
            "mm_ms": 1e3 * result.timings["torch.mm"].median, "ratio": result.ratio("cpp", "torch.mm"),
            "load_average": result.load_average, "warnings": result.warnings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="processes per build (default 3)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per process (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--build-dir", required=True, help="root of the three build folders (kept between runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.rounds, args.threads)))
        return 0
    from m2d_kernels.backends import cpp

    isas = [name for name in ISAS if cpp.ISA_FLAGS[name][1] <= cpp._cpu_flags()]
    results: dict[str, list[dict]] = {name: [] for name in isas}
    for _ in range(args.runs):
        for name in isas:
            env = {**os.environ, "M2D_ISA": name, "M2D_BUILD_DIR": str(Path(args.build_dir).resolve())}
            done = subprocess.run([sys.executable, __file__, "--child", "1", "--rounds", str(args.rounds),
                                   "--threads", str(args.threads), "--build-dir", args.build_dir],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"isa_builds: the {name} process failed:\n{done.stderr}", file=sys.stderr)
                return 1
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    print("\nbuild        cpp / torch.mm (runs; median)   cpp share of torch.mm's rate   cpp median ms (runs)")
    for name, runs in results.items():
        ratios = " / ".join(f"{run['ratio']:.2f}" for run in runs)
        median = statistics.median(run["ratio"] for run in runs)
        medians = " / ".join(f"{run['cpp_ms']:.0f}" for run in runs)
        # The forward+backward counts 4 times the FLOPs of the forward products torch.mm runs.
        print(f"{name:<12} {ratios}; {median:.2f}   {100 * 4 / median:.0f} %   {medians}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
