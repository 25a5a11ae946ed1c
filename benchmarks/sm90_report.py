"""Compile-time evidence for the Triton kernels on Hopper, without a GPU.

Compiles every kernel config the launcher can choose (the heuristic's and the opt-in autotuner's)
at the worked example (L=12, B=N=8192, D=768, dims 32..768), bf16 and fp32, for sm_90 and reads
the cubin with Triton's ``cuobjdump``: registers, spill (stack) bytes, shared memory, wgmma
(HGMMA) instructions and 128-bit async copies (LDGSTS.128 or TMA), for the plain pass or (``--rules``)
with rules of the pass as compile-time flags. Prints a table and, with
``--json PATH``, writes ``{"forward_flops", "backward_flops", "kernels": [...]}`` atomically.
This is compile-time evidence, not a timing.

    python benchmarks/sm90_report.py --json benchmarks/results/sm90_report.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from m2d_kernels.backends import triton_kernels as tk  # noqa: E402
from m2d_kernels.train.atomic import atomic_write  # noqa: E402

WORKED_EXAMPLE = {"L": 12, "B": 8192, "N": 8192, "D": 768, "dims": (32, 64, 128, 256, 512, 768)}
INT_POINTERS = {"positives_ptr", "bounds_ptr", "active_ptr", "n_seg_ptr", "row_group_ptr"}
INPUT_POINTERS = {"rows_ptr", "cols_ptr", "grad_ptr"}
SCALARS = {"L": "i32", "R": "i32", "C": "i32", "D": "i32", "DG": "i32", "G": "i32", "K": "i32", "R_CLASS": "i32",
           "C_CLASS": "i32",
           "scale_log2": "fp32", "penalty_log2": "fp32"}
# --rules names -> the kernels' compile-time rule flags (m2d_kernels.rules); none given = the plain pass.
RULES = {"dot": {"SIMILARITY_DOT": True}, "exclude": {"EXCLUDE_GROUP": True}, "penalty": {"PENALTY_MODE": 1},
         "guided": {"GUIDED": True}, "teacher": {"TEACHER": True}, "triangle": {"TRIANGLE": True},
         "column_statistics": {"COLUMN_STATS": True}}
PLAIN_FLAGS = {"SIMILARITY_DOT": False, "EXCLUDE_GROUP": False, "PENALTY_MODE": 0, "GUIDED": False, "TEACHER": False,
               "TRIANGLE": False, "COLUMN_STATS": False}
DTYPES = {"bf16": "bf16", "fp32": "fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def tool(name: str) -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def flops(example=WORKED_EXAMPLE) -> tuple[int, int]:
    """Tensor-core FLOPs of one direction at the example, all pairs active: forward 2*L*B*N*top,
    backward two launches of (recompute + product) = 4x that."""
    forward = 2 * example["L"] * example["B"] * example["N"] * example["dims"][-1]
    return forward, 4 * forward


def _signature(fn, constexprs, dtype):
    return {
        name: "constexpr" if name in constexprs else SCALARS.get(name)
        or ("*i32" if name in INT_POINTERS else f"*{dtype}" if name in INPUT_POINTERS else "*fp32")
        for name in fn.arg_names
    }


def compile_kernel(kind: str, dtype: str, config, example=WORKED_EXAMPLE, rules=()):
    """Compile one (kernel, dtype, config) with the named rules for sm_90; returns the cubin and the
    dynamic shared bytes."""
    block_r, block_c, warps, stages = config
    dims = example["dims"]
    block_d, aligned = tk._block_d(dims, example["D"], TORCH_DTYPES[dtype])
    constexprs = {"M": len(dims), "M_PAD": max(2, triton.next_power_of_2(len(dims))), "ALIGNED": aligned,
                  "DOT_PRECISION": "tf32x3" if dtype == "fp32" else "tf32", "DOT_IN_FP32": False,
                  "BLOCK_R": block_r, "BLOCK_C": block_c, "BLOCK_D": block_d, "BLOCK_DG": tk.BLOCK_DG, **PLAIN_FLAGS}
    for name in rules:
        constexprs.update(RULES[name])
    if kind == "forward":
        fn = tk._m2d_fwd_kernel
        constexprs.update(FIXED_MAX=not constexprs["SIMILARITY_DOT"], SCALE_GRAD=False)
    else:
        fn = tk._m2d_bwd_kernel
        constexprs.update(FOR_COLS=kind == "backward_dY")
    source = ASTSource(fn, _signature(fn, constexprs, dtype),
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                              for name in fn.arg_names if name.endswith("_ptr") or name == "D"})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["cubin"], compiled.metadata.shared


def inspect_cubin(cubin: bytes, shared: int) -> dict:
    """Registers, stack, shared bytes and instruction counts read from the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    text = usage.stdout
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {
        "registers": number(r"REG:(\d+)"),
        "spill_bytes": number(r"STACK:(\d+)"),
        "shared_bytes": number(r"SHARED:(\d+)") + shared,
        "wgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "async_copies_128": len(re.findall(r"\bLDGSTS\.[A-Z.]*128\b", sass)) + len(re.findall(r"\bUTMALDG\b", sass)),
        "mma_sync": len(re.findall(r"\bHMMA\.", sass)),
        # Global stores: 128-bit (STG.E.128) and narrower ones (2, 4 or 8 bytes per instruction).
        "stores_128": len(re.findall(r"\bSTG\.E\.128\b", sass)),
        "stores_narrow": len(re.findall(r"\bSTG\.E(?!\.128\b)[A-Z0-9.]*", sass)),
    }


def candidate_configs(kind: str, dtype: str, rules=()):
    """(config, selected): every config the launcher can choose; `selected` marks the heuristic's."""
    listed = tk.FORWARD_CONFIGS if kind == "forward" else tk.BACKWARD_CONFIGS
    ex = WORKED_EXAMPLE
    chosen = tk._heuristic_config(kind, TORCH_DTYPES[dtype], ex["B"], ex["N"], plain=not rules,
                                  triangle="triangle" in rules, column_statistics="column_statistics" in rules)
    return [(config, config == chosen) for config in dict.fromkeys((*listed, chosen))]


def report(kinds=("forward", "backward_dX", "backward_dY"), dtypes=("bf16", "fp32"), only_selected=False, rules=()):
    rows = []
    for kind in kinds:
        for dtype in dtypes:
            for config, selected in candidate_configs(kind, dtype, rules):
                if only_selected and not selected:
                    continue
                stats = inspect_cubin(*compile_kernel(kind, DTYPES[dtype], config, rules=rules))
                rows.append({"kernel": kind, "dtype": dtype, "rules": list(rules), "config": dict(zip(
                    ("BLOCK_R", "BLOCK_C", "num_warps", "num_stages"), config, strict=True)),
                    "selected": selected, **stats})
                print(_format(rows[-1]), flush=True)
    forward, backward = flops()
    return {"forward_flops": forward, "backward_flops": backward, "example": {**WORKED_EXAMPLE,
            "dims": list(WORKED_EXAMPLE["dims"]),
            "block_d": {dtype: tk._block_d(WORKED_EXAMPLE["dims"], 768, TORCH_DTYPES[dtype])[0] for dtype in dtypes}},
            "kernels": rows}


def _format(row):
    c = row["config"]
    tile = f"{c['BLOCK_R']}x{c['BLOCK_C']}/{c['num_warps']}w/{c['num_stages']}s"
    return (f"{row['kernel']:<12} {row['dtype']:<5} {tile:<18} {'*' if row['selected'] else ' '} "
            f"reg {row['registers']:>3}  spill {row['spill_bytes']:>5}  smem {row['shared_bytes']:>6}  "
            f"wgmma {row['wgmma']:>4}  ldgsts128 {row['async_copies_128']:>4}  hmma {row['mma_sync']:>4}  "
            f"stg128 {row['stores_128']:>3}  stg<128 {row['stores_narrow']:>3}")


def write_json_atomically(data, path: Path) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(data, indent=1) + "\n").encode()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--selected-only", action="store_true", help="compile only the heuristic's configs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="default: bf16 and fp32")
    parser.add_argument("--rules", default="", help=f"comma-separated rules of the pass, of {sorted(RULES)} "
                        "(penalty = in_batch_negatives); several passes separated by ';' (one table and one "
                        "JSON list of kernels for all); default: the plain pass")
    args = parser.parse_args(argv)
    if not tool("cuobjdump").exists() or not tool("ptxas").exists():
        print("ptxas/cuobjdump not found in triton's backends/nvidia/bin", file=sys.stderr)
        return 2
    forward, backward = flops()
    print(f"forward {forward:.3e} FLOPs, backward {backward:.3e} FLOPs ({backward / forward:.1f}x); * = selected")
    rule_sets = [tuple(name for name in part.split(",") if name) for part in args.rules.split(";")]
    if unknown := {name for rules in rule_sets for name in rules} - set(RULES):
        parser.error(f"--rules: unknown {sorted(unknown)}")
    data = None
    for rules in rule_sets:
        if len(rule_sets) > 1:
            print(f"rules: {','.join(rules) or 'plain'}")
        part = report(dtypes=tuple(args.dtype or DTYPES), only_selected=args.selected_only, rules=rules)
        data = part if data is None else {**data, "kernels": data["kernels"] + part["kernels"]}
    if args.json:
        write_json_atomically(data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
