"""Benchmark configuration: machine and library versions in every stored JSON."""

import datetime
import platform

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
