"""Compile for sm_90, without a GPU, exactly the Triton kernels the launcher launches.

Each case calls the public function (forward and backward, ``backend="triton"``) on CPU tensors with the
two kernels' launches recorded instead of run; each recorded launch is then compiled the way Triton's JIT
compiles it at launch (its binder: divisibility-16 attributes of pointers and integers, integers equal to
1 turned into constants), for sm_90, under a driver that only answers "sm_90" and never launches. A
specialisation compiles once; later launches with the same one are the same kernel. Each row of the report
reads its cubin with Triton's ``cuobjdump``: registers, spill (stack) bytes, shared memory, wgmma (HGMMA)
instructions and 128-bit async copies (LDGSTS.128 or TMA). A compile error is a row with
``"compiled": false`` and the error; the report still finishes. This is compile-time evidence, not a timing.

    python benchmarks/sm90_report.py --json benchmarks/results/sm90_report.json
    python benchmarks/sm90_report.py --case worked --candidates      # also the autotuner's other tiles

The cases (``CASES``) are the worked example (L=12, B=N=8192, D=768, dims 32..768) and edge shapes: L = 1,
one dim, dims not multiples of 16, B < 16, every rule the public options reach (dot, own-group exclusion,
each penalty, guide, teacher, triangle, column statistics) alone and as the composer combines them, and
symmetric; each in bf16 and fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

import m2d_kernels as m2d  # noqa: E402
from m2d_kernels.backends import triton_configs as tc  # noqa: E402
from m2d_kernels.backends import triton_kernels as tk  # noqa: E402
from m2d_kernels.train.atomic import atomic_write  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132  # the H200's: the backward's persistent grid and scratch are sized by it
WORKED_EXAMPLE = {"L": 12, "B": 8192, "N": 8192, "D": 768, "dims": (32, 64, 128, 256, 512, 768)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = {"_m2d_fwd_kernel": "forward", "_m2d_bwd_kernel": "backward"}
ALL4 = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


@dataclass(frozen=True)
class Case:
    """One call of the public function: shape (L, B, N, D, dims) and its keyword options."""

    name: str
    shape: tuple
    options: dict
    guide: bool = False  # pass a guide (GIST's filtering): rules.guided


_W = (WORKED_EXAMPLE["L"], WORKED_EXAMPLE["B"], WORKED_EXAMPLE["N"], WORKED_EXAMPLE["D"], WORKED_EXAMPLE["dims"])
_SMALL = (2, 24, 48, 64, (16, 32, 64))
CASES = [
    Case("worked", _W, {}),
    Case("worked-symmetric", _W, {"symmetric": True}),
    # The shared tiles' three rule sets: column statistics; triangle + column statistics; and with exclusion.
    Case("worked-q2d-d2q", _W, {"directions": ("query_to_doc", "doc_to_query")}),
    Case("worked-q2d-q2q", _W, {"directions": ("query_to_doc", "query_to_query")}),
    Case("worked-joint4", _W, {"directions": ALL4}),
    Case("L1-one-dim", (1, 24, 24, 64, (64,)), {}),
    Case("dims-not-16", (2, 24, 48, 40, (8, 20, 40)), {}),
    Case("B5", (2, 5, 10, 64, (32, 64)), {}),
    Case("B1-L1", (1, 1, 2, 32, (16, 32)), {"directions": ("query_to_doc", "query_to_query")}),
    Case("odd-offset", _SMALL, {"odd_offset": True}),  # embeddings at a storage offset of one element
    Case("learnable-scale", _SMALL, {"scale": "learnable"}),
    Case("dot", _SMALL, {"similarity": "dot", "scale": 0.5}),
    Case("scale-100", _SMALL, {"scale": 100.0}),  # the running maximum instead of the fixed one
    Case("q2q", _SMALL, {"directions": ("query_to_doc", "query_to_query")}),
    Case("q2d-d2q", _SMALL, {"directions": ("query_to_doc", "doc_to_query")}),
    Case("q2d-d2d", _SMALL, {"directions": ("query_to_doc", "doc_to_doc")}),
    Case("joint4", _SMALL, {"directions": ALL4}),
    Case("joint4-dot", _SMALL, {"directions": ALL4, "similarity": "dot", "scale": 0.5}),
    Case("in-batch-negatives", _SMALL, {"hardness_mode": "in_batch_negatives", "hardness_strength": 5.0}),
    Case("hard-negatives", _SMALL, {"hardness_mode": "hard_negatives", "hardness_strength": 5.0}),
    Case("all-negatives-joint4", _SMALL, {"directions": ALL4, "hardness_mode": "all_negatives",
                                          "hardness_strength": 5.0}),
    Case("per-direction-hardness", _SMALL, {"directions": ("query_to_doc", "doc_to_query"),
                                            "partition_mode": "per_direction",
                                            "hardness_mode": "in_batch_negatives", "hardness_strength": 2.0}),
    Case("guide", _SMALL, {"directions": ("query_to_doc", "query_to_query", "doc_to_doc")}, guide=True),
    Case("guide-dot", _SMALL, {"similarity": "dot", "scale": 0.5}, guide=True),
    Case("teacher", _SMALL, {"distill": True}),
    Case("teacher-L1", (1, 24, 48, 64, (32, 64)), {"distill": True}),
    Case("teacher-joint4-hardness", _SMALL, {"directions": ALL4, "distill": True,
                                             "hardness_mode": "in_batch_negatives", "hardness_strength": 3.0}),
]


@dataclass
class Launch:
    kernel: triton.JITFunction
    args: tuple
    kwargs: dict
    grid: object


class _CompileOnlyDriver:
    """What the JIT asks of the active driver to compile a launch with ``warmup=True``: never a launch."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _kernels():
    return (tk._m2d_fwd_kernel, tk._m2d_bwd_kernel)


@contextlib.contextmanager
def recorded_launches():
    """Run the public function with the kernels' launches recorded (and not run): yields the list."""
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, args, kwargs, grid))
        return run

    saved = (tk.unavailable_reason, tk._multiprocessors)
    tk.unavailable_reason = lambda device: None  # CPU tensors stand for CUDA ones: nothing is run
    tk._multiprocessors = lambda device: SMS
    for kernel in _kernels():
        kernel.run = recorder(kernel)
    try:
        yield launches
    finally:
        tk.unavailable_reason, tk._multiprocessors = saved
        for kernel in _kernels():
            del kernel.run


def case_launches(case: Case, dtype: torch.dtype, random: bool = True) -> list[Launch]:
    """The launches of one forward and backward of ``case`` in ``dtype``, in order. ``random=False`` leaves the
    embeddings uninitialised (nothing is run, so their values do not matter): large shapes record faster."""
    n_layers, n_queries, n_docs, n_features, dims = case.shape
    generator = torch.Generator().manual_seed(0)
    options = dict(case.options)
    offset = int(options.pop("odd_offset", False))

    def leaf(n_rows):
        size = offset + n_layers * n_rows * n_features
        flat = torch.randn(size, generator=generator).to(dtype) if random else torch.empty(size, dtype=dtype)
        return flat[offset:].view(n_layers, n_rows, n_features).detach().requires_grad_()

    queries, docs = leaf(n_queries), leaf(n_docs)
    if options.get("scale") == "learnable":
        options["scale"] = torch.tensor(20.0, requires_grad=True)
    if options.pop("distill", False):
        options["distill_weights"] = torch.ones(n_layers, len(dims))
    if case.guide:
        options["guide"] = (torch.randn(n_queries, 24, generator=generator).to(dtype),
                            torch.randn(n_docs, 24, generator=generator).to(dtype))
    with recorded_launches() as launches:
        loss = m2d.matryoshka_2d_infonce(queries, docs, dims, backend="triton", **options)
        loss.backward()
    return launches


def _by_name(kernel, mapping) -> dict:
    """Triton's ``{(argument index,): value}`` as ``{argument name: value}``."""
    return {kernel.arg_names[path[0]] if len(path) == 1 else str(path): value for path, value in mapping.items()}


@dataclass
class Compiled:
    """One launch compiled as the JIT would: Triton's compiled kernel (None on a compile error), the error, the
    seconds it took on this CPU (0 when Triton's cache had it) and what ``_do_compile`` was given (``key``,
    ``constexprs``, ``attrs``, ``options``; empty when Triton's in-memory cache answered without compiling)."""

    kernel: object | None
    error: str | None
    seconds: float
    seen: dict


def compile_as_launched(launch: Launch, compiled_keys: set | None = None) -> Compiled | None:
    """Compile ``launch`` for sm_90 under the compile-only driver; None when its specialisation's key is in
    ``compiled_keys`` (Triton does not cache failures: a failed one would be compiled again). The key is added."""
    kernel = launch.kernel
    seen = {}
    original = kernel._do_compile

    def do_compile(key, signature, device, constexprs, options, attrs, warmup):
        seen.update(key=key, constexprs=constexprs, attrs=attrs, options=options)
        if compiled_keys is not None:
            if key in compiled_keys:
                raise _Repeated
            compiled_keys.add(key)
        return original(key, signature, device, constexprs, options, attrs, warmup)

    kernel._do_compile = do_compile
    previous = driver._active  # None without a GPU: reset_active() would look for a real driver
    driver.set_active(_CompileOnlyDriver())
    started = time.perf_counter()
    try:
        compiled, error = kernel.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs), None
    except _Repeated:
        return None
    except Exception as exception:  # the callers list it and go on
        compiled, error = None, f"{type(exception).__name__}: {str(exception).strip().splitlines()[-1][:400]}"
    finally:
        del kernel._do_compile
        driver._active = previous
    return Compiled(compiled, error, round(time.perf_counter() - started, 2), seen)


def compile_launch(launch: Launch, compiled_keys: set) -> dict | None:
    """Compile ``launch`` as the JIT would (sm_90): the row of the report, or None when its specialisation
    was compiled before."""
    result = compile_as_launched(launch, compiled_keys)
    if result is None or not result.seen:
        return None
    kernel, seen, compiled = launch.kernel, result.seen, result.kernel
    constexprs = _by_name(kernel, seen["constexprs"])
    name = KERNELS[kernel.fn.__name__]
    if name == "backward":
        name = "backward_dY" if constexprs.get("FOR_COLS") else "backward_dX"
    row = {"kernel": name, "constexprs": {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                          for k, v in constexprs.items()},
           "attrs": {k: v for k, v in _by_name(kernel, seen["attrs"]).items()},
           "num_warps": seen["options"].num_warps, "num_stages": seen["options"].num_stages,
           "compiled": compiled is not None, "error": result.error,
           "compile_seconds": result.seconds}  # this CPU; 0 when Triton's cache had it
    if compiled is not None:
        row.update(inspect_cubin(compiled.asm["cubin"], compiled.metadata.shared))
    return row


class _Repeated(Exception):
    pass


def tool(name: str) -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def cuobjdump(cubin: bytes, option: str) -> str:
    """``cuobjdump option`` of a cubin (Triton's copy of the tool): its standard output."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([tool("cuobjdump"), option, path], capture_output=True, text=True, check=True).stdout


def inspect_cubin(cubin: bytes, shared: int) -> dict:
    """Registers, stack, shared bytes and instruction counts read from the cubin."""
    text, sass = cuobjdump(cubin, "-res-usage"), cuobjdump(cubin, "-sass")
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


def flops(example=WORKED_EXAMPLE) -> tuple[int, int]:
    """Tensor-core FLOPs of one direction at the example, all pairs active: forward 2*L*B*N*top,
    backward two launches of (recompute + product) = 4x that."""
    forward = 2 * example["L"] * example["B"] * example["N"] * example["dims"][-1]
    return forward, 4 * forward


def _candidate_launches(launch: Launch) -> list[Launch]:
    """The worked example's plain launch with each of the autotuner's other tiles (not selected)."""
    listed = tc.FORWARD_CONFIGS if launch.kernel is tk._m2d_fwd_kernel else tc.BACKWARD_CONFIGS
    chosen = (launch.kwargs["BLOCK_R"], launch.kwargs["BLOCK_C"], launch.kwargs["num_warps"],
              launch.kwargs["num_stages"])
    return [Launch(launch.kernel, launch.args, {**launch.kwargs, **dict(zip(
        ("BLOCK_R", "BLOCK_C", "num_warps", "num_stages"), config, strict=True))}, launch.grid)
        for config in listed if config != chosen]


def report(cases=CASES, dtypes=tuple(DTYPES), candidates=False, echo=True) -> dict:
    rows, compiled_keys = [], set()
    for case in cases:
        for dtype in dtypes:
            launches = [(launch, True) for launch in case_launches(case, DTYPES[dtype])]
            if candidates and case.name == "worked":
                launches += [(other, False) for launch, _ in launches for other in _candidate_launches(launch)]
            for launch, selected in launches:
                row = compile_launch(launch, compiled_keys)
                if row is None:
                    continue
                rows.append({"case": case.name, "dtype": dtype, "selected": selected, **row})
                if echo:
                    print(_format(rows[-1]), flush=True)
    forward, backward = flops()
    return {"triton": triton.__version__, "target": "sm_90", "forward_flops": forward, "backward_flops": backward,
            "example": {**WORKED_EXAMPLE, "dims": list(WORKED_EXAMPLE["dims"])}, "kernels": rows}


def _format(row):
    c = row["constexprs"]
    tile = f"{c.get('BLOCK_R')}x{c.get('BLOCK_C')}/{row['num_warps']}w/{row['num_stages']}s"
    flags = ",".join(f"{k}={v}" for k, v in c.items() if k in tc.RULE_FLAGS and v) or "plain"
    head = f"{row['case']:<24} {row['kernel']:<12} {row['dtype']:<5} {tile:<16} {'*' if row['selected'] else ' '}"
    if not row["compiled"]:
        return f"{head} FAILED {row['error']}"
    return (f"{head} reg {row['registers']:>3} spill {row['spill_bytes']:>4} smem {row['shared_bytes']:>6} "
            f"wgmma {row['wgmma']:>3} ldgsts128 {row['async_copies_128']:>3} hmma {row['mma_sync']:>3} "
            f"stg128 {row['stores_128']:>3} stg<128 {row['stores_narrow']:>3}  {flags}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here (atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="default: bf16 and fp32")
    parser.add_argument("--case", action="append", choices=[case.name for case in CASES],
                        help="only these cases (default: all)")
    parser.add_argument("--candidates", action="store_true",
                        help="also compile the autotuner's other tiles at the worked example (not selected)")
    args = parser.parse_args(argv)
    if not tool("cuobjdump").exists() or not tool("ptxas").exists():
        print("ptxas/cuobjdump not found in triton's backends/nvidia/bin", file=sys.stderr)
        return 2
    cases = [case for case in CASES if args.case is None or case.name in args.case]
    data = report(cases, tuple(args.dtype or DTYPES), args.candidates)
    failed = [row for row in data["kernels"] if not row["compiled"]]
    seconds = sum(row["compile_seconds"] for row in data["kernels"])
    print(f"{len(data['kernels'])} specialisations compiled for sm_90 (triton {triton.__version__}) in "
          f"{seconds:.0f} s, {len(failed)} failed; * = what the launcher selects")
    if args.json:
        atomic_write(args.json, lambda file: file.write((json.dumps(data, indent=1) + "\n").encode()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
