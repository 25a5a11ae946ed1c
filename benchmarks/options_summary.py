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
        if "ratio_median" not in info:  # test_joint4_over_query_to_doc: side_by_side()
            medians[info["provider"]][info["case"]] = bench["stats"]["median"]
    return {provider: {case: (median, median / cases["query_to_doc"]) for case, median in cases.items()}
            for provider, cases in medians.items() if "query_to_doc" in cases}


def side_by_side(path: str) -> dict[str, dict]:
    """provider -> test_joint4_over_query_to_doc's extra_info (per-round ratios of interleaved steps)."""
    with open(path) as file:
        run = json.load(file)
    return {bench["extra_info"]["provider"]: bench["extra_info"] for bench in run["benchmarks"]
            if "ratio_median" in bench["extra_info"]}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    for provider, cases in ratios(argv[0]).items():
        print(f"{provider}:")
        for case, (median, ratio) in cases.items():
            print(f"  {case:14s} {median * 1e3:9.1f} ms  {ratio:5.2f}x")
    for provider, info in side_by_side(argv[0]).items():
        low, high = info["ratio_quartiles"]
        print(f"{provider}: joint4 / query_to_doc, interleaved rounds: median {info['ratio_median']:.2f}x "
              f"(quartiles {low:.2f}-{high:.2f}, {len(info['joint4_seconds'])} rounds)")


if __name__ == "__main__":
    main(sys.argv[1:])
