"""The Triton backend's tile configurations and launch heuristics: which tile, warps and stages a launch
takes, the k-chunk (``BLOCK_D``) both passes share, and how many persistent backward programs fit the
scratch budget. What each selected specialisation compiles to on sm_90 (registers, spills, wgmma) is
measured by ``benchmarks/sm90_report.py`` into ``benchmarks/results/sm90_report.json``; the choices here
are the spill-free ones of that report."""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from m2d_kernels.rules import PLAIN

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Bytes of fp32 scratch all backward programs may hold together: stays resident in L2 (50 MB on H100).
SCRATCH_BUDGET = 32 << 20
# Opt-in autotuning; otherwise `_heuristic_config` picks the tile without a single trial run.
AUTOTUNE_ENV = "M2D_TRITON_AUTOTUNE"
# Under the interpreter only: the fp32 product to emulate (default "tf32x3-emulated", what the GPU runs).
INTERPRET_FP32_ENV = "M2D_TRITON_INTERPRET_FP32"
# The rules of a pass (m2d_kernels.rules) as compile-time flags of both kernels; all off = the plain pass.
RULE_FLAGS = ("SIMILARITY_DOT", "EXCLUDE_GROUP", "PENALTY_MODE", "GUIDED", "TEACHER", "TRIANGLE", "COLUMN_STATS")
BLOCK_DG = 32  # chunk of the guide embeddings' width in the per-tile guide product


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------
# Tile configurations: (BLOCK_R, BLOCK_C, num_warps, num_stages)
# ---------------------------------------------------------------------------------------

# Forward and backward share BLOCK_D (a function of the dims, `_block_d`) so that the backward's recompute
# adds the same chunks in the same order as the forward: bit-identical logits. The heuristic takes the first
# config the problem fills; the first ones are spill-free on sm_90, the rest are there for the opt-in
# autotuner. Each choice below is the spill-free one of the sm_90 report for its launch
# (`python benchmarks/sm90_report.py`, stored in benchmarks/results/sm90_report.json with its Triton version).
FORWARD_CONFIGS = ((64, 128, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 128, 8, 3),
                   (128, 64, 4, 3), (128, 128, 8, 4))
BACKWARD_CONFIGS = ((64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3),
                    (64, 128, 8, 3), (128, 128, 8, 3))
# fp32 runs as tf32x3, which keeps hi and lo halves of both operands in registers: narrower tiles, a 16-wide
# k-chunk (`_block_d`) and 32-row dY tiles.
FP32_FORWARD_CONFIG = (64, 64, 4, 3)
FP32_BACKWARD_CONFIGS = {"backward_dX": (64, 64, 8, 2), "backward_dY": (32, 64, 8, 2)}
# With rules the mask, penalty and teacher tiles stay live across the dim loop: the forward takes 64x64 over
# 8 warps.
RULES_FORWARD_CONFIG = (64, 64, 8, 3)
# The shared-tile passes (rules.triangle / column_statistics) keep the column statistics live in the
# backward: smaller tiles, per dtype and launch; fp32's triangle dY takes 64x32.
SHARED_TILES_BACKWARD_CONFIGS = {
    torch.bfloat16: {"backward_dX": (64, 32, 4, 2), "backward_dY": (32, 128, 8, 2)},
    torch.float32: {"backward_dX": (32, 32, 4, 2), "backward_dY": (32, 64, 8, 2)},
}
SHARED_TILES_FP32_TRIANGLE_DY = (64, 32, 8, 2)
INTERPRETER_CONFIG = (16, 16, 1, 1)  # tl.dot needs tiles >= 16; the CPU interpreter wants few ops


def _heuristic_config(kind: str, dtype: torch.dtype, n_rows: int, n_cols: int, plain: bool = True,
                      triangle: bool = False, column_statistics: bool = False) -> tuple[int, int, int, int]:
    """The config a launch (``kind``: forward, backward_dX or backward_dY) uses when autotuning is off: the
    first of the kind's list that the problem fills (small batches take the 64-wide tiles); fp32 takes
    FP32_FORWARD_CONFIG / FP32_BACKWARD_CONFIGS, a forward with rules (``plain=False``) RULES_FORWARD_CONFIG,
    a backward with ``triangle`` or ``column_statistics`` (the shared tiles) SHARED_TILES_BACKWARD_CONFIGS."""
    if _interpreting():
        return INTERPRETER_CONFIG
    if kind == "forward" and not plain:
        return RULES_FORWARD_CONFIG
    if kind != "forward" and (triangle or column_statistics):
        shared_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16  # fp16 tiles as bf16's
        if shared_dtype == torch.float32 and kind == "backward_dY" and triangle:
            return SHARED_TILES_FP32_TRIANGLE_DY
        return SHARED_TILES_BACKWARD_CONFIGS[shared_dtype][kind]
    if kind == "forward" and dtype == torch.float32:
        return FP32_FORWARD_CONFIG
    if kind in FP32_BACKWARD_CONFIGS and dtype == torch.float32:
        return FP32_BACKWARD_CONFIGS[kind]
    for config in FORWARD_CONFIGS if kind == "forward" else BACKWARD_CONFIGS:
        classes = _size_classes(n_rows, n_cols)
        if config[0] <= max(64, classes["R_CLASS"]) and config[1] <= max(64, classes["C_CLASS"]):
            return config
    return (64, 64, 4, 3)


def _triton_configs(configs):
    return [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w, num_stages=s) for r, c, w, s in configs]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the problem's size class (they would only mask)."""
    kept = [c for c in configs if c.kwargs["BLOCK_R"] <= max(64, named_args["R_CLASS"])
            and c.kwargs["BLOCK_C"] <= max(64, named_args["C_CLASS"])]
    return kept or configs[:1]


def _autotuned(kernel, configs, key, reset_to_zero=None):
    """At most 12 configs, keyed by size class (next power of two of R and C, so a smaller last
    batch reuses the choice), the choice cached on disk by Triton (``cache_results``). ``reset_to_zero``:
    the outputs a kernel adds to (atomics), zeroed before every trial run and before the chosen one."""
    return triton.autotune(configs=_triton_configs(configs), key=list(key), cache_results=True,
                           reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    """SMs of the GPU; the interpreter runs programs one after another, two exercise the persistent loop."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _block_d(dims, n_features: int, dtype: torch.dtype | None = None) -> tuple[int, bool]:
    """(BLOCK_D, ALIGNED): the widest chunk of 64, 32 or 16 that divides every dim, so that no chunk
    straddles a boundary and the loads need no k mask; 32 with masks when the dims are not multiples
    of 16 (or the rows' stride D is not). fp32 (tf32x3: hi and lo halves of both operands live in
    registers) always takes 16, which keeps its backward spill-free on sm_90."""
    common = math.gcd(*dims)
    fp32 = dtype == torch.float32
    for block in (16,) if fp32 else (64, 32, 16):
        if common % block == 0 and n_features % 16 == 0:
            return block, True
    return (16 if fp32 else 32), False


def _kernel_options(x: torch.Tensor, dims, scale: float) -> dict:
    block_d, aligned = _block_d(dims, x.shape[-1], x.dtype)
    return {
        "M": len(dims),
        "M_PAD": max(2, triton.next_power_of_2(len(dims))),
        "ALIGNED": aligned,
        "BLOCK_D": block_d,
        # fp32 inputs run on tensor cores as three tf32 products (hi*hi + hi*lo + lo*hi): about fp32's
        # accuracy at a third of tf32's rate, instead of FFMA without tensor cores. The interpreter emulates them.
        "DOT_PRECISION": _fp32_precision() if x.dtype == torch.float32 else "tf32",
        # The interpreter's tl.dot misreads bfloat16 tiles: multiply in fp32 there (see _mma_operand).
        "DOT_IN_FP32": x.dtype == torch.bfloat16 and _interpreting(),
    }


def _fp32_precision() -> str:
    """The tl.dot precision of fp32 inputs: tf32x3 on the GPU; under the interpreter its emulation, or what
    M2D_TRITON_INTERPRET_FP32 names ("ieee", "tf32-emulated": the error comparison of benchmarks/tf32_error.py)."""
    if not _interpreting():
        return "tf32x3"
    precision = os.environ.get(INTERPRET_FP32_ENV, "tf32x3-emulated")
    if precision not in ("tf32x3-emulated", "tf32-emulated", "ieee"):
        raise ValueError(f"{INTERPRET_FP32_ENV}={precision!r}: expected tf32x3-emulated, tf32-emulated or ieee")
    return precision


def _size_classes(n_rows: int, n_cols: int) -> dict:
    return {"R_CLASS": triton.next_power_of_2(n_rows), "C_CLASS": triton.next_power_of_2(n_cols)}


def _tile_kwargs(kind, x, n_rows, n_cols, rules=PLAIN):
    """Launch meta-parameters when autotuning is off (None when on: the autotuner chooses)."""
    if os.environ.get(AUTOTUNE_ENV) == "1" and not _interpreting():
        return None
    block_r, block_c, warps, stages = _heuristic_config(kind, x.dtype, n_rows, n_cols, rules.is_plain, rules.triangle,
                                                        rules.column_statistics > 0)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": warps, "num_stages": stages}


def _backward_programs(block_r: int, block_c: int, n_features: int, n_dims: int, sms: int) -> int:
    """Persistent backward programs of a tile: one per SM, fewer if their fp32 scratch (work rows of the
    owned block, ``n_dims - 1`` tile slots) would not stay in the L2 budget; at least one."""
    per_program = 4 * (max(block_r, block_c) * n_features + (n_dims - 1) * block_r * block_c)
    return max(1, min(sms, SCRATCH_BUDGET // per_program))
