"""Error of the Triton backend's fp32 products against the float64 oracle, measured without a GPU.

On the GPU fp32 inputs multiply as Triton's ``tf32x3`` (its F32DotTC pass: ``big = rna(x)`` rounded to
tf32, ``small = x - big``, then ``small*big + big*small + big*big`` on tf32 tensor cores, which read only
the top 19 bits of an fp32 operand). Under ``TRITON_INTERPRET=1`` the kernels emulate that at the operand
level (``triton_kernels._dot``); ``M2D_TRITON_INTERPRET_FP32`` switches the interpreter to the exact fp32
product (``ieee``) or to a single tf32 product (``tf32-emulated``) for comparison. Each problem runs in
every mode and in PyTorch's own fp32 (the ``reference`` backend); the error is the largest absolute
difference from the float64 truth (computed from the same fp32 inputs) over the loss and over each
gradient, divided by the truth's largest entry. The GPU's accumulation order inside an MMA differs from
NumPy's, so this models the operand rounding, not every last bit.

    TRITON_INTERPRET=1 python benchmarks/tf32_error.py --json benchmarks/results/tf32_error.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import m2d_kernels as m2d
from m2d_kernels.backends import triton_configs as tc
from m2d_kernels.train.atomic import atomic_write

MODES = ("ieee", "tf32x3-emulated", "tf32-emulated")
# (name, keyword arguments of matryoshka_2d_infonce): cos at the default and a large scale, dot products of
# unnormalised rows (logits up to ~|x|^2, the largest absolute errors), and a hardness penalty.
CASES = (
    ("cos-scale20", {"scale": 20.0}),
    ("cos-scale100-symmetric", {"scale": 100.0, "symmetric": True}),
    ("dot-scale0.1", {"similarity": "dot", "scale": 0.1}),
    ("cos-scale20-hard_negatives", {"scale": 20.0, "hardness_mode": "hard_negatives", "hardness_strength": 5.0}),
)
SHAPE = {"L": 2, "B": 48, "N": 144, "D": 128, "dims": (32, 64, 128)}


def _loss_and_grads(queries, docs, backend, kwargs):
    queries = queries.detach().clone().requires_grad_(True)
    docs = docs.detach().clone().requires_grad_(True)
    loss = m2d.matryoshka_2d_infonce(queries, docs, SHAPE["dims"], backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), queries.grad, docs.grad


def _relative_errors(got, truth) -> dict:
    return {name: ((g.double() - t).abs().max() / t.abs().max()).item()
            for name, g, t in zip(("loss", "grad_queries", "grad_docs"), got, truth, strict=True)}


def measure(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(SHAPE["L"], SHAPE["B"], SHAPE["D"], generator=generator)
    docs = torch.randn(SHAPE["L"], SHAPE["N"], SHAPE["D"], generator=generator)
    rows = []
    for name, kwargs in CASES:
        truth = _loss_and_grads(queries.double(), docs.double(), "reference", kwargs)
        row = {"case": name, "kwargs": kwargs,
               "reference_fp32": _relative_errors(_loss_and_grads(queries, docs, "reference", kwargs), truth)}
        for mode in MODES:
            os.environ[tc.INTERPRET_FP32_ENV] = mode
            row[mode] = _relative_errors(_loss_and_grads(queries, docs, "triton", kwargs), truth)
        os.environ.pop(tc.INTERPRET_FP32_ENV)
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _format(row) -> str:
    parts = [f"{row['case']:<27}"]
    for mode in ("reference_fp32", *MODES):
        errors = row[mode]
        parts.append(f"{mode}: " + "/".join(f"{errors[k]:.1e}" for k in ("loss", "grad_queries", "grad_docs")))
    return "  ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the errors here (atomically)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run under TRITON_INTERPRET=1: on a GPU the products are the hardware's, not these emulations")
    print(f"shape {SHAPE}; relative errors loss/grad_queries/grad_docs against float64")
    rows = measure()
    if args.json:
        payload = {"shape": {**SHAPE, "dims": list(SHAPE["dims"])}, "cases": rows}
        atomic_write(args.json, lambda file: file.write((json.dumps(payload, indent=1) + "\n").encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
