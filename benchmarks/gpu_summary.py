"""Summary of a benchmarks/gpu.sh run against the issue's targets: a JSON and at most MAX_LINES printed lines.

    python benchmarks/gpu_summary.py --stage a pass 48.2 --stage b timeout 100.0 \
        --worked OUTDIR/stage_b_worked.json --bench OUTDIR/stage_d_bench.json -o OUTDIR/summary.json

Inputs: each stage's status (pass, fail, timeout or skipped) and wall seconds, the worked example's JSON
(benchmarks/gpu_worked_example.py) and the benchmark grid's pytest-benchmark JSON (benchmarks/test_bench_gpu.py);
either JSON may be missing or partial (a stage stopped by its limit): what it would give is "not measured".
Exit status 1 when a stage failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gpu_stages import STAGES

MAX_LINES = 40
MB = 1e6
FAILED = ("fail", "timeout")
# The targets (worked example: forward+backward, bf16, one GPU).
WORKED_MS = 10.0
VS_REFERENCE = 10.0
VS_COMPILE = 3.0
EXTRA_MB = 100.0  # beyond inputs and gradients
B65536_MS = 1000.0


def _load(path):
    """The JSON at ``path``, or None (missing, or cut short by a killed writer)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def worked_numbers(worked):
    """The worked example's medians (ms), speed-ups, rates and memory (MB); None where not measured."""
    timings = (worked or {}).get("timings", {})
    median = lambda name: timings.get(name, {}).get("median_ms")  # noqa: E731
    rate = lambda name: timings.get(name, {}).get("tflops")  # noqa: E731
    total, reference, compiled = (median(name) for name in (
        "triton_forward_backward", "reference_forward_backward", "reference_compile_forward_backward"))
    peak = (worked or {}).get("peak_extra_bytes", {}).get("triton")
    compile_entry = timings.get("reference_compile_forward_backward", {})
    return {
        "forward_ms": median("triton_forward"),
        "forward_tflops": rate("triton_forward"),
        "backward_ms": median("triton_backward"),
        "backward_tflops": rate("triton_backward"),
        "forward_backward_ms": total,
        "forward_backward_tflops": rate("triton_forward_backward"),
        "reference_ms": reference,
        "speedup_vs_reference": reference / total if reference and total else None,
        "compile_reference_ms": compiled,
        "speedup_vs_compile": compiled / total if compiled and total else None,
        "compile_s": compile_entry.get("compile_s"),
        "compile_failure": compile_entry.get("failure"),
        "mm_tflops": rate("mm_bf16"),
        "peak_extra_mb": peak / MB if peak is not None else None,
        "beyond_inputs_and_grads_mb": (peak - worked["grad_bytes"]) / MB if peak is not None else None,
    }


def grid_medians(bench):
    """{case: {provider: median ms}} of the benchmark grid, with peak memory where recorded."""
    table = {}
    for entry in (bench or {}).get("benchmarks", []):
        info = entry["extra_info"]
        if "provider" not in info:
            continue
        row = {"median_ms": entry["stats"]["median"] * 1e3}
        if "peak_extra_bytes" in info:
            row["peak_extra_mb"] = info["peak_extra_bytes"] / MB
        table.setdefault(entry["group"], {})[info["provider"]] = row
    return table


def targets(numbers, grid):
    """[{target, met: True / False / None (not measured), value}] in a fixed order."""
    def check(target, value, passes, text):
        if value is None:
            return {"target": target, "met": None, "value": "-"}
        return {"target": target, "met": passes(value), "value": text.format(value)}

    big = grid.get("b65536", {}).get("triton", {}).get("median_ms")
    rows = [
        check(f"worked forward+backward <= {WORKED_MS:g} ms", numbers["forward_backward_ms"],
              lambda v: v <= WORKED_MS, "{:.2f} ms"),
        check(f"worked >= {VS_REFERENCE:g}x the eager reference", numbers["speedup_vs_reference"],
              lambda v: v >= VS_REFERENCE, "{:.1f}x"),
        check(f"worked >= {VS_COMPILE:g}x torch.compile(reference)", numbers["speedup_vs_compile"],
              lambda v: v >= VS_COMPILE, "{:.1f}x"),
        check(f"worked < {EXTRA_MB:g} MB beyond inputs and gradients", numbers["beyond_inputs_and_grads_mb"],
              lambda v: v < EXTRA_MB, "{:.1f} MB"),
        check(f"B=65536 forward+backward < {B65536_MS:g} ms", big, lambda v: v < B65536_MS, "{:.0f} ms"),
    ]
    single = grid.get("single", {})
    if "triton" in single and "inf-cl" in single:  # only where Inf-CL is installed
        ratio = single["inf-cl"]["median_ms"] / single["triton"]["median_ms"]
        rows.append(check("single pair faster than Inf-CL", ratio, lambda v: v > 1, "{:.2f}x"))
    return rows


def _value(value, unit, digits=2):
    return f"{value:9.{digits}f} {unit}" if value is not None else f"{'-':>9}"


def _worked_lines(numbers, shape, repeats):
    def timed(name):
        rate = numbers[f"{name}_tflops"]
        return _value(numbers[f"{name}_ms"], "ms") + (f"  {rate:.0f} TFLOP/s" if rate else "")

    faster = lambda ratio: f"  triton {ratio:.1f}x faster" if ratio else ""  # noqa: E731
    compile_note = ""
    if numbers["compile_s"] is not None:
        failure = numbers["compile_failure"]
        compile_note = f" (compile {numbers['compile_s']:.0f} s{', ' + failure if failure else ''})"
    return [
        f"worked example (L={shape['L']}, B={shape['B']}, N={shape['N']}, D={shape['D']}, dims "
        f"{','.join(map(str, shape['dims']))}, {shape['dtype'].removeprefix('torch.')}), median of {repeats}:",
        f"  triton forward            {timed('forward')}",
        f"  triton backward           {timed('backward')}",
        f"  triton forward+backward   {timed('forward_backward')}",
        f"  reference (eager)         {_value(numbers['reference_ms'], 'ms')}{faster(numbers['speedup_vs_reference'])}",
        f"  torch.compile(reference)  {_value(numbers['compile_reference_ms'], 'ms')}"
        f"{faster(numbers['speedup_vs_compile'])}{compile_note}",
        f"  bf16 torch.mm 8192^3      {_value(numbers['mm_tflops'], 'TFLOP/s', 0)}",
        f"  peak memory beyond inputs {_value(numbers['peak_extra_mb'], 'MB', 1)}",
    ]


def render(summary):
    """The printed summary: at most MAX_LINES lines."""
    numbers = summary["worked"]
    versions = "".join(f", {key} {summary[key]}" for key in ("torch", "triton") if summary.get(key))
    lines = [f"== gpu.sh summary: {summary.get('device') or 'device unknown'}{versions}"]
    for name, status, seconds in summary["stages"]:
        lines.append(f"stage {name}  {STAGES[name][0]:<26} {status:<8} {seconds:6.1f} s")
    if all(value is None for value in numbers.values()):
        lines.append("worked example: not measured")
    else:
        lines += _worked_lines(numbers, summary["shape"], summary["repeats"])
    if summary["grid"]:
        lines.append("benchmark grid (stage d), median ms:")
        for case, providers in summary["grid"].items():
            lines.append(f"  {case:<8} " + "  ".join(f"{p} {row['median_ms']:.1f}" for p, row in providers.items()))
    lines.append("targets:")
    for row in summary["targets"]:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[row["met"]]
        lines.append(f"  {verdict:<13} {row['target']:<46} {row['value']}")
    failed = [f"{name} {status}" for name, status, _ in summary["stages"] if status in FAILED]
    skipped = [name for name, status, _ in summary["stages"] if status == "skipped"]
    lines.append("gpu.sh: " + ("FAILED: " + ", ".join(failed) if failed else "every stage that ran passed")
                 + (f" (no time left for: {', '.join(skipped)})" if skipped else ""))
    if len(lines) > MAX_LINES:
        lines[MAX_LINES - 1:] = [f"... ({len(lines) - MAX_LINES + 1} more lines: see summary.json)"]
    return lines


def summarise(stages, worked_path, bench_path):
    worked, bench = _load(worked_path), _load(bench_path)
    numbers = worked_numbers(worked)
    grid = grid_medians(bench)
    source = worked or (bench or {}).get("machine_info", {})
    return {
        "device": source.get("device"),
        "torch": source.get("torch"),
        "triton": source.get("triton"),
        "cuda": (worked or {}).get("cuda"),
        "shape": (worked or {}).get("shape"),
        "repeats": (worked or {}).get("repeats"),
        "stages": stages,
        "worked": numbers,
        "targets": targets(numbers, grid),
        "grid": grid,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", nargs=3, action="append", default=[], metavar=("NAME", "STATUS", "SECONDS"),
                        help="a stage's name, status (pass, fail, timeout, skipped) and wall seconds")
    parser.add_argument("--worked", required=True, help="the worked example's JSON (may be missing)")
    parser.add_argument("--bench", required=True, help="the benchmark grid's pytest-benchmark JSON (may be missing)")
    parser.add_argument("-o", "--output", required=True, help="the summary JSON to write")
    args = parser.parse_args(argv)
    stages = []
    for name, status, seconds in args.stage:
        if name not in STAGES or status not in ("pass", "skipped", *FAILED):
            parser.error(f"--stage {name} {status}: unknown stage or status")
        stages.append((name, status, float(seconds)))
    summary = summarise(stages, args.worked, args.bench)
    with open(f"{args.output}.tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(f"{args.output}.tmp", args.output)
    print("\n".join(render(summary)))
    return 1 if any(status in FAILED for _, status, _ in stages) else 0


if __name__ == "__main__":
    sys.exit(main())
