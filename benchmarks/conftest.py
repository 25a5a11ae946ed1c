"""Benchmark configuration: machine and library versions and the load average in every stored JSON; failed
benchmarks stay out of it; a GFLOP/s and peak-memory summary after pytest-benchmark's table."""

import datetime
import os
import platform

import pytest
import torch

_LOAD_AT_START = {}


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def pytest_sessionstart(session):
    _LOAD_AT_START["value"] = _load_average()


def pytest_benchmark_update_machine_info(config, machine_info):
    import m2d_kernels

    # 1/5/15-minute load averages before and after the run: a baseline recorded on a busy machine says so.
    machine_info["load_average_start"] = _LOAD_AT_START.get("value")
    machine_info["load_average"] = _load_average()

    machine_info["torch"] = torch.__version__
    machine_info["m2d_kernels"] = m2d_kernels.__version__
    machine_info["cpu_threads"] = torch.get_num_threads()
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    machine_info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A benchmark stopped mid-measurement (pytest-timeout, or SIGINT at a time limit: benchmarks/gpu.sh) is
    marked failed, so that pytest-benchmark leaves it out of the JSON instead of failing to write any JSON."""
    try:
        return (yield)
    except BaseException:
        benchmark = getattr(item, "funcargs", {}).get("benchmark")
        if benchmark is not None:
            benchmark.has_error = True
        raise


def _summary_rows(benchmarks):
    rows = []
    for bench in benchmarks:
        extra = getattr(bench, "extra_info", None) or {}
        if getattr(bench, "has_error", False) or not ({"gflops", "peak_extra_bytes"} & set(extra)):
            continue
        peak = extra.get("peak_extra_bytes")
        rows.append((getattr(bench, "group", None) or "", getattr(bench, "name", "?"),
                     f"{extra['gflops']:.1f}" if "gflops" in extra else "-",
                     f"{peak / 2**20:.1f}" if peak is not None else "-"))
    return rows


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """pytest-benchmark's table has time columns only: the extra_info figures the suites record, per benchmark."""
    session = getattr(config, "_benchmarksession", None)
    rows = _summary_rows(getattr(session, "benchmarks", []) or [])
    if not rows:
        return
    width = max(len(name) for _, name, _, _ in rows)
    terminalreporter.write_sep("-", "GFLOP/s (at the median) and peak memory added by the call")
    terminalreporter.write_line(f"{'benchmark':<{width}}  {'GFLOP/s':>9}  {'peak MiB':>9}")
    for _, name, gflops, peak in sorted(rows):
        terminalreporter.write_line(f"{name:<{width}}  {gflops:>9}  {peak:>9}")
