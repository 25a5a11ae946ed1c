"""What the ``cpp`` build's instruction set is worth on this CPU: portable, ``-march=native`` and native with
512-bit vectors, each timed against ``torch.mm`` side by side (docs/benchmarks.md, "What a user on each CPU gets").

    python benchmarks/isa_builds.py --runs 3 --build-dir <folder>     (from a checkout: PYTHONPATH=$PWD)

Each build compiles once into ``--build-dir`` (about 45 s of CPU time each). The builds run in fresh processes,
alternating (portable, native, native-512, portable, ...), each timing ``cpp`` forward+backward and the
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

# name -> (M2D_NATIVE, the ISA flags the child uses in place of build_flags()'s).
BUILDS = {
    "portable": ("0", None),
    "native-256": ("1", ["-march=native"]),
    "native-512": ("1", ["-march=native", "-mprefer-vector-width=512"]),
}
SHAPE = (7, 1024, 2048, 384)
DIMS = (32, 64, 128, 256, 384)


def child(isa: list[str] | None, rounds: int, threads: int) -> dict:
    import torch

    import m2d_kernels as m2d
    from m2d_kernels import timing
    from m2d_kernels.backends import cpp

    if isa is not None:  # replace the ISA flags, keep the others (their order is part of the folder's key)
        base = cpp.build_flags
        cpp.build_flags = lambda: ([f for f in base()[0] if not f.startswith(("-m", "-march"))] + isa, base()[1])
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
        print(json.dumps(child(json.loads(args.child), args.rounds, args.threads)))
        return 0
    results: dict[str, list[dict]] = {name: [] for name in BUILDS}
    for _ in range(args.runs):
        for name, (native, isa) in BUILDS.items():
            env = {**os.environ, "M2D_NATIVE": native, "M2D_BUILD_DIR": str(Path(args.build_dir).resolve())}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(isa), "--rounds", str(args.rounds),
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
