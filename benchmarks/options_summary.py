"""Ratios of each loss option's step to the plain query_to_doc step, per provider, from one stored run.

    python benchmarks/options_summary.py benchmarks/results/<machine>/<run>_options-cpu.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def ratios(path: str) -> dict[str, dict[str, tuple[float, float]]]:
    """provider -> case -> (median seconds, median / query_to_doc median)."""
    with open(path) as file:
        run = json.load(file)
    medians = defaultdict(dict)
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        medians[info["provider"]][info["case"]] = bench["stats"]["median"]
    return {provider: {case: (median, median / cases["query_to_doc"]) for case, median in cases.items()}
            for provider, cases in medians.items() if "query_to_doc" in cases}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    for provider, cases in ratios(argv[0]).items():
        print(f"{provider}:")
        for case, (median, ratio) in cases.items():
            print(f"  {case:14s} {median * 1e3:9.1f} ms  {ratio:5.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
