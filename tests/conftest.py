"""Test configuration shared by every test module.

Triton kernels run on the CPU under the interpreter when there is no GPU; the variable
must be set before any kernel module (or triton itself) is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
