"""Render a stored pytest-benchmark JSON as a bar chart: median time and peak extra memory per provider.

    python benchmarks/plot.py benchmarks/results/<machine>/0001_cpu.json -o benchmarks/results/cpu.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON file")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench["extra_info"].get("provider", bench["name"])
        groups[bench["group"]][provider] = (bench["stats"]["median"], bench["extra_info"].get("peak_extra_bytes"))
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for column, (group, providers) in enumerate(sorted(groups.items())):
        names = list(providers)
        times = [providers[n][0] * 1e3 for n in names]
        memory = [(providers[n][1] or 0) / 2**20 for n in names]
        for row, values, label in ((0, times, "median forward+backward (ms)"), (1, memory, "peak extra memory (MiB)")):
            ax = axes[row][column]
            bars = ax.bar(names, values, color="tab:blue" if row == 0 else "tab:orange")
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(group if row == 0 else "")
            ax.tick_params(axis="x", rotation=30)
    machine = data["machine_info"]
    fig.suptitle(f"{machine.get('device', machine.get('cpu', {}).get('brand_raw', ''))}, torch {machine.get('torch')}, "
                 f"{machine.get('date', data.get('datetime', ''))[:10]}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
