"""Peak memory of one call beyond what was allocated before it.

GPU: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (VmHWM),
reset through ``/proc/self/clear_refs`` after returning freed heap pages to the system,
so the figure is what the call itself added (tracemalloc does not see PyTorch's
allocations). Linux only on the CPU; elsewhere returns None.
"""

from __future__ import annotations

import ctypes
import gc
import os

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak RSS to the current RSS
    fn()
    return (_status_kib("VmHWM") - before) * 1024
