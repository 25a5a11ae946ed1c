"""Benchmark configuration: machine and library versions in every stored JSON; failed benchmarks stay out of it."""

import datetime
import platform

import pytest
import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    import m2d_kernels

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
