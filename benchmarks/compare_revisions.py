"""Two revisions of the library timed side by side on one machine, in interleaved rounds.

Each round runs one child process per revision (A, B, A, B, ...), each importing that revision's
``m2d_kernels`` from a temporary git worktree and timing every case (forward + backward of the public
function, medians over ``--repeats`` steps after one warm-up); the ratio B / A per case is the median over
the rounds of the per-round ratios, so a load that drifts during the run (a busy shared machine) cancels
out of it. The C++ backend builds once per revision (its build folder is keyed by the source).

    python benchmarks/compare_revisions.py 81bac62 HEAD --json benchmarks/results/one-path-cpu.json

The JSON holds the machine (CPU model, threads, torch version, load average before and after), the
cases with their shapes and FLOPs, every round's medians, and the summary rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIMS = (32, 64, 128, 256, 384)
# (name, backend, L, B, N, D, options): the CPU grid of test_bench_loss.py and the symmetric, learnable-scale,
# custom-layout and joint four-direction variants of the default options.
CASES = [
    ("q2d-L7-B256", "cpp", 7, 256, 512, 384, {}),
    ("q2d-L7-B256", "torch", 7, 256, 512, 384, {}),
    ("q2d-L7-B1024", "cpp", 7, 1024, 2048, 384, {}),
    ("q2d-L7-B1024", "torch", 7, 1024, 2048, 384, {}),
    ("symmetric-L7-B1024", "cpp", 7, 1024, 2048, 384, {"symmetric": True}),
    ("symmetric-L7-B1024", "torch", 7, 1024, 2048, 384, {"symmetric": True}),
    ("symmetric-positive-index-L7-B1024", "cpp", 7, 1024, 2048, 384, {"symmetric": True, "positive_index": True}),
    ("learnable-scale-L7-B1024", "cpp", 7, 1024, 2048, 384, {"learnable_scale": True}),
    ("joint4-L4-B512", "cpp", 4, 512, 1024, 384,
     {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")}),
]

CHILD = r"""
import json, statistics, sys, time
import torch
import m2d_kernels as m2d

cases, repeats, dims = json.loads(sys.argv[1]), int(sys.argv[2]), tuple(json.loads(sys.argv[3]))
torch.manual_seed(0)
out = {}
for name, backend, L, B, N, D, options in cases:
    queries = torch.randn(L, B, D).requires_grad_()
    docs = torch.randn(L, N, D).requires_grad_()
    kwargs = {k: v for k, v in options.items() if k not in ("positive_index", "learnable_scale")}
    if options.get("positive_index"):
        kwargs["positive_index"] = torch.arange(B)
    if options.get("learnable_scale"):
        kwargs["scale"] = torch.tensor(20.0, requires_grad=True)

    def step():
        queries.grad = docs.grad = None
        m2d.matryoshka_2d_infonce(queries, docs, dims, backend=backend, **kwargs).backward()

    step()  # warm-up: the C++ build, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    out[f"{name}/{backend}"] = statistics.median(times)
print(json.dumps({"medians": out, "threads": torch.get_num_threads(), "torch": torch.__version__}))
"""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _run(worktree: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(worktree)}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES), str(repeats), json.dumps(DIMS)],
                            cwd=worktree, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the child for {worktree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _stop(signum, frame):
    raise KeyboardInterrupt  # the worktrees are removed in main's finally


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="git revision A (the baseline)")
    parser.add_argument("after", help="git revision B")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A then B each round)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case and child")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    load_before = os.getloadavg()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="m2d-compare-") as scratch:
        trees = {}
        for label, revision in (("before", args.before), ("after", args.after)):
            trees[label] = Path(scratch) / label
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees[label]), revision],
                           check=True)
        try:
            for index in range(args.rounds):
                entry = {label: _run(tree, args.repeats) for label, tree in trees.items()}
                entry["load_average"] = os.getloadavg()
                rounds.append(entry)
                print(f"round {index + 1}/{args.rounds}: " + ", ".join(
                    f"{key} {entry['after']['medians'][key] / entry['before']['medians'][key]:.3f}"
                    for key in entry["before"]["medians"]), flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    rows = []
    for name, backend, L, B, N, D, options in CASES:
        key = f"{name}/{backend}"
        before = [r["before"]["medians"][key] for r in rounds]
        after = [r["after"]["medians"][key] for r in rounds]
        ratios = [b / a for a, b in zip(before, after)]
        rows.append({"case": key, "shape": {"L": L, "B": B, "N": N, "D": D, "dims": list(DIMS)},
                     "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
                     "before_ms": [1e3 * t for t in before], "after_ms": [1e3 * t for t in after],
                     "ratio_after_over_before": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)})
    print(f"{'case':<48} {'before ms':>10} {'after ms':>10} {'after/before':>13}")
    for row in rows:
        print(f"{row['case']:<48} {statistics.median(row['before_ms']):>10.1f} "
              f"{statistics.median(row['after_ms']):>10.1f} {row['ratio_after_over_before']:>8.3f} "
              f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]")
    if args.json:
        from m2d_kernels._files import atomic_write

        record = {"before": args.before, "after": args.after, "rounds": args.rounds, "repeats": args.repeats,
                  "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": rounds[0]["after"]["threads"],
                              "torch": rounds[0]["after"]["torch"], "load_average_before": load_before,
                              "load_average_after": os.getloadavg()},
                  "command": "python benchmarks/compare_revisions.py " + " ".join(sys.argv[1:]),
                  "rows": rows, "raw_rounds": rounds}
        text = (json.dumps(record, indent=1) + "\n").encode()
        atomic_write(args.json, lambda file: file.write(text))


if __name__ == "__main__":
    main()
