"""Plot time and peak extra memory against B, from a test_bench_memory_scaling.py JSON or the
JSON lines that memory_scaling.py prints.

    python benchmarks/plot_memory_scaling.py RESULTS.json -o memory-scaling.png
    python benchmarks/memory_scaling.py > rows.jsonl && python benchmarks/plot_memory_scaling.py rows.jsonl -o m.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON, or memory_scaling.py's JSON lines")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    series = defaultdict(list)  # provider -> [(B, median s, peak extra MiB, inputs MiB)]
    with open(args.results) as f:
        text = f.read()
    if text.lstrip().startswith('{"benchmarks"') or '"machine_info"' in text[:2000]:
        data = json.loads(text)
        for bench in data["benchmarks"]:
            info = bench["extra_info"]
            series[info["provider"]].append(
                (info["shape"]["B"], bench["stats"]["median"], (info["peak_extra_bytes"] or 0) / 2**20,
                 info["input_bytes"] / 2**20)
            )
    else:
        data = {}
        for row in map(json.loads, filter(None, text.splitlines())):
            data = {"machine_info": {"device": "cpu", "cpu_threads": row["threads"]}}
            series[row["backend"]].append(
                (row["B"], statistics.median(row["times_s"]), row["peak_extra_bytes"] / 2**20,
                 row["input_bytes"] / 2**20)
            )
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider, rows in sorted(series.items()):
        rows.sort()
        batch = [r[0] for r in rows]
        time_ax.plot(batch, [r[1] for r in rows], "o-", label=provider)
        memory_ax.plot(batch, [r[2] for r in rows], "o-", label=f"{provider} extra memory")
    inputs = sorted({(r[0], r[3]) for rows in series.values() for r in rows})
    memory_ax.plot([b for b, _ in inputs], [m for _, m in inputs], "k--", label="inputs")
    for ax, label in ((time_ax, "median forward+backward (s)"), (memory_ax, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("B (N = 2B, L = 1, D = 384)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    machine = data.get("machine_info", {})
    threads = machine.get("cpu_threads", "?")
    fig.suptitle(f"{machine.get('device', 'cpu')}, {threads} threads, {data.get('datetime', '')}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)


if __name__ == "__main__":
    main()
