"""A GPU cost model of the Triton kernels per launch, from their tile loops and sm_90 SASS: a model, not a timing.

The launches are the ones the public function ``m2d_kernels.matryoshka_2d_infonce(..., backend="triton")`` makes
(forward and backward) at a shape, recorded on CPU tensors by ``sm90_report.case_launches`` and, unless
``--no-sass``, compiled for sm_90 as launched (``sm90_report.compile_as_launched``; Triton's cache keeps each
specialisation's cubin, so a second run compiles nothing). For each launch::

    tensor = MMA FLOPs / (tc_tflops * rate * eff)    rate 1 for bf16/fp16, 1/2 for tf32 (fp32's tf32x3: 3 products)
    HBM    = compulsory bytes / hbm_tbps              inputs, outputs, statistics once; scratch once (written back)
                                                      unless it exceeds the L2 (then every scratch access)
    L2     = bytes between the SMs and L2 / l2_tbps    every global load and store the tile loops issue
    exp    = exp2 count / (exp_per_clk * sms * clock * eff)
    issue  = thread instructions * warps / (4 * sms * clock * eff)    4 warp-instructions issued per clock per SM
    time   = max(tensor, HBM, L2, exp, issue) + launch_us              the binding resource is the argmax

``eff`` is the SMs' share of busy time: a plain grid's ``programs / (ceil(programs / slots) * slots)`` with
``slots = sms * (programs resident per SM)`` (registers and shared memory of the cubin, 1 without it); a
persistent grid (the backward) has ``P <= sms`` programs, one per SM, sharing ``W`` work items, so
``eff = W / (ceil(W / P) * sms)`` (idle SMs and the last round's tail). HBM and L2 are shared: not divided.

Bytes (``*_bytes`` in the JSON) come from the kernels' loops (``m2d_kernels/backends/triton_forward.py``,
``triton_backward.py``), cited per term in ``forward_launch`` / ``backward_launch``; scalar loads (bounds,
flags, coefficients) are not counted.

Instructions (``--no-sass`` skips them; the issue row is then "not measured"): the cubin's SASS
(``cuobjdump -sass``) is split at its branches. A backward branch (target at or below its address) closes a
loop ``[target, branch]``; loops nest by their address ranges. Inside a loop, the code that a forward branch
(conditional, or the unconditional jump over an else part) skips without leaving the loop is conditional. Each
loop gets a role from what it holds: a loop with tensor-core instructions (HGMMA/HMMA) is a k-loop (trips:
``top / BLOCK_D`` chunks); the loops around k-loops are, from the outside, the backward's work-item loop (trips:
items per program), the tile loop (trips: streamed tiles per item or per row block), and segment loops (trips:
active segments ``n_seg``; their k-loops ``top / BLOCK_D / n_seg`` on average); a loop without MMA is a chunk
loop (the work rows' zeroing, the gradient's store: ``top / BLOCK_D``, or ``n_seg`` around an inner one).
Conditional code in a k-loop runs at the segment boundaries (``n_seg`` per tile in the forward's epilogue,
``n_seg - 1`` for the backward's slot stores and slot adds), except, in the forward, a conditional part of the
epilogue without exponentials (the positive's extraction, ``has_pos``), which runs on the tiles that hold a
positive (the diagonal: ``max(1, BLOCK_R / BLOCK_C) / (C / BLOCK_C)`` of them); conditional code in other loops
is counted at every iteration (an upper bound). The dynamic count per thread is each instruction's count times
the trips of its loops; per launch, times the programs. For the plain pass with flat k-loops (the worked
example) the loop structure matches the source's (checked: one k-loop in the forward's tile loop, two in the
backward's) and the count is labelled ``loops``; for other specialisations (rules, segment loops, teacher)
it is labelled ``estimate``. Not modelled: latencies (an HGMMA waited on at once, barriers), bank conflicts, the
L2's hit rate on streamed operands, local-memory (spill) traffic.

    python benchmarks/gpu_model.py                                   # the worked example, today's kernels
    python benchmarks/gpu_model.py --design all --targets --json benchmarks/results/gpu_model_worked.json
    python benchmarks/gpu_model.py --B 65536 --N 65536 --design all --no-sass

Designs (``--design``, not built yet; ``all`` for every one) are modelled from formulas at the same shape with
the same resources: ``today`` (the launches), ``forward-128x128`` (the forward at 128x128 tiles: the kernel
compiled at that config), ``in-place-128`` (today's backward streaming 128-wide tiles with bf16 slots) and
``two-phase:<T>:<tile>[:<gemm>[:<budget MiB>]]`` (a Triton pass recomputes S and writes bf16 suffix sums H_m,
then tensor-core GEMMs; ``<T>`` where the per-dim terms live before the suffix sum: ``l2-fp32``, ``h-bf16``,
``regs-fp32``, ``regs-bf16``; ``<tile>`` e.g. 64x64, 64x128 or 128x128; ``<gemm>`` cublas or grouped; the budget
of H, else --memory-budget-mb). The designs other than ``today`` take the 128x128 forward. Each design's
assumptions are in its JSON entry; a design that cannot be built at the shape (H of one row block over its
budget) is listed under ``designs_skipped``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import sm90_report as sm90  # first: it drops TRITON_INTERPRET (compile for the GPU, not the interpreter)
import torch

from m2d_kernels._files import atomic_write
from m2d_kernels.backends import triton_configs as tc

DEFAULTS = {"tc_tflops": 790.0, "hbm_tbps": 4.3, "l2_tbps": 7.0, "exp_per_clk": 16.0, "clock_ghz": 1.83,
            "sms": 132, "l2_mb": 50.0, "launch_us": 3.0, "register_budget_kb": 160.0, "memory_budget_mb": 1024.0}
ISSUE_PER_CLK = 4  # warp-instructions issued per clock per SM (four schedulers)
REGISTER_FILE = 65536  # 32-bit registers per SM
SHARED_PER_SM = 227 * 1024
TWO_PHASE_T = ("l2-fp32", "h-bf16", "regs-fp32", "regs-bf16")
TWO_PHASE_TILES = ((64, 64), (64, 128), (128, 128))
GEMM_TILE = (128, 256)  # the GEMMs' output tile (rows x columns) for their operand re-reads


# ---------------------------------------------------------------------------------------
# Launch specs: what a launch computes, read from the recorded launch
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One kernel launch: kind (forward, backward_dX, backward_dY), shape, dims, tiles and the rules' flags."""

    kind: str
    L: int
    R: int
    C: int
    D: int
    bounds: tuple  # (0, d_1, ..., d_M)
    n_seg: tuple  # per layer: segments up to the last active dim
    active: tuple  # [L][M] bools
    element: int  # bytes of an embedding element
    block_r: int
    block_c: int
    block_d: int
    warps: int
    stages: int
    programs: int
    flags: dict = field(default_factory=dict, hash=False, compare=False)
    products: int = 1  # MMA products per tl.dot: 3 for fp32's tf32x3
    tf32: bool = False

    @property
    def M(self) -> int:
        return len(self.bounds) - 1

    def flag(self, name):
        return self.flags.get(name, False)


def spec_of(launch: sm90.Launch) -> Spec:
    """The Spec of a recorded launch (its tensors are CPU tensors: the tables are read directly)."""
    args = dict(zip(launch.kernel.arg_names, launch.args))
    kwargs = launch.kwargs
    kind = "forward" if launch.kernel.fn.__name__ == "_m2d_fwd_kernel" else (
        "backward_dY" if kwargs["FOR_COLS"] else "backward_dX")
    active = tuple(tuple(bool(v) for v in row) for row in args["active_ptr"].tolist())
    grid = launch.grid if isinstance(launch.grid, tuple) else tuple(launch.grid)
    fp32 = args["rows_ptr"].dtype == torch.float32
    return Spec(kind, int(args["L"]), int(args["R"]), int(args["C"]), int(args["D"]),
                tuple(int(v) for v in args["bounds_ptr"].tolist()), tuple(int(v) for v in args["n_seg_ptr"].tolist()),
                active, args["rows_ptr"].element_size(), kwargs["BLOCK_R"], kwargs["BLOCK_C"], kwargs["BLOCK_D"],
                kwargs["num_warps"], kwargs["num_stages"], math.prod(grid),
                {k: v for k, v in kwargs.items() if k in tc.RULE_FLAGS or k in (
                    "ALIGNED", "FIXED_MAX", "SCALE_GRAD", "TEACHER", "K", "DOT_PRECISION")} | {
                    "K": int(args["K"]), "DG": int(args["DG"])},
                products=3 if fp32 else 1, tf32=fp32)


def _cdiv(a, b):
    return -(-a // b)


def _layer(spec: Spec, layer: int):
    """(n_seg, top, active pairs up to top) of one layer."""
    n_seg = spec.n_seg[layer]
    return n_seg, spec.bounds[n_seg], sum(spec.active[layer][:n_seg])


def plain(spec: Spec) -> bool:
    return not any(spec.flag(name) for name in tc.RULE_FLAGS) and not spec.flag("TEACHER")


# ---------------------------------------------------------------------------------------
# Work and bytes per launch, from the tile loops
# ---------------------------------------------------------------------------------------


def forward_tile_l2(spec: Spec, top: int, n_active: int) -> dict:
    """L2 bytes of one forward tile (``_forward_tile``): each k-chunk loads X[rows, chunk] and Y[cols, chunk]
    (``_accumulate_chunk`` -> ``_load_operand``, twice); each active pair's epilogue gathers the rows' and
    columns' inverse norms (``_forward_epilogue`` -> ``_pair_logits``; none with SIMILARITY_DOT)."""
    br, bc = spec.block_r, spec.block_c
    out = {"operands": (br + bc) * top * spec.element,
           "norms": 0 if spec.flag("SIMILARITY_DOT") else n_active * (br + bc) * 4}
    if spec.flag("COLUMN_STATS"):  # atomics of the columns' sums: a read and a write at L2 per column and pair
        out["atomics"] = n_active * bc * 4 * 2
    return out


def backward_tile_l2(spec: Spec, top: int, n_active: int, slot_bytes: int = 4) -> dict:
    """L2 bytes of one backward tile (``_backward_tile``): the recompute loads X and Y chunks over [0, top)
    (``_accumulate_chunk``); each active pair below the top writes its fp32 W_m slot (``_store_slot``) that the
    downward loop reads back (``_add_slot``); each active pair's ``_weighted_gradient`` gathers rx, ry, the row
    maximum and log-sum and the owner's norm factors; the downward loop (``_product_chunk``) reloads the other
    operand's chunk (Y for dX, X for dY) and loads and stores the owner's fp32 work rows for every chunk."""
    br, bc, e = spec.block_r, spec.block_c, spec.element
    for_cols = spec.kind == "backward_dY"
    own, other = (bc, br) if for_cols else (br, bc)
    dot = spec.flag("SIMILARITY_DOT")
    per_pair = (0 if dot else br + bc + own) + 2 * br  # rx, ry, norm (own axis); row max and log-sum
    if spec.flag("COLUMN_STATS"):
        per_pair += 2 * bc  # the columns' offset and log-sum
    out = {"recompute_operands": (br + bc) * top * e,
           "slots": 2 * (n_active - 1) * br * bc * slot_bytes,
           "product_operand": other * top * e,
           "work_rows": 2 * own * top * 4,
           "statistics": n_active * per_pair * 4}
    if for_cols:
        out["statistics"] += br * 4  # the streamed rows' positives, per tile (_m2d_bwd_kernel's FOR_COLS loop)
    return out


@dataclass
class Work:
    """What one launch does, summed: MMA FLOPs, exp2 count, L2 bytes by term (and per tile), compulsory HBM
    bytes by term, tiles, work units and their programs."""

    flops: float = 0.0
    exps: float = 0.0
    l2: Counter = field(default_factory=Counter)
    hbm: Counter = field(default_factory=Counter)
    tiles: int = 0
    per_tile_l2: dict = field(default_factory=dict)
    work_units: int = 0
    persistent: bool = False
    scratch_bytes: int = 0
    notes: list = field(default_factory=list)


def _forward_tiles_per_block(spec: Spec, block: int) -> int:
    """Column tiles a forward program streams (``_m2d_fwd_kernel``: from c_start, the triangle's first tile)."""
    c_start = (block * spec.block_r + 1) // spec.block_c * spec.block_c if spec.flag("TRIANGLE") else 0
    return _cdiv(max(0, spec.C - c_start), spec.block_c)


def forward_launch(spec: Spec) -> Work:
    """The forward (``_m2d_fwd_kernel``): grid (row block, layer), each program streams the column tiles of one
    layer (with TEACHER one program walks every layer per column tile and adds the teacher's product)."""
    w = Work(work_units=spec.programs)
    br, bc, e = spec.block_r, spec.block_c, spec.element
    row_blocks = _cdiv(spec.R, br)
    per_block = [_forward_tiles_per_block(spec, b) for b in range(row_blocks)]
    teacher = spec.flag("TEACHER")
    t_top = spec.bounds[spec.n_seg[-1]]
    for layer in range(spec.L):
        n_seg, top, n_active = _layer(spec, layer)
        if n_seg == 0:
            continue  # n_streamed = 0: a layer without active pairs streams nothing
        tiles = sum(per_block)
        w.tiles += tiles
        w.flops += tiles * 2 * br * bc * top * spec.products
        per_tile = forward_tile_l2(spec, top, n_active)
        if teacher:  # the tables are reloaded and stored per (tile, layer): four loads, four stores of [BR, M]
            per_tile["teacher_tables"] = 8 * br * spec.M * 4
        for term, value in per_tile.items():
            w.l2[term] += tiles * value
        w.per_tile_l2 = w.per_tile_l2 or per_tile
        w.exps += tiles * n_active * br * bc * (2 if spec.flag("COLUMN_STATS") else 1)
        if not spec.flag("FIXED_MAX"):
            w.exps += tiles * n_active * br  # the running maximum's rescale
    if teacher:  # the teacher's product over layer L - 1's [0, top), once per tile, and its exponentials
        t_tiles = sum(per_block)
        w.flops += t_tiles * 2 * br * bc * t_top * spec.products
        w.l2["teacher_operands"] += t_tiles * (br + bc) * t_top * e
        w.exps += t_tiles * br * bc
    outputs = 3 + bool(spec.flag("SCALE_GRAD")) + bool(teacher)  # max, log-sum, row loss (+ dscale, teacher sum)
    w.l2["positives"] += spec.programs * br * 4
    w.l2["statistics_out"] += spec.L * spec.R * spec.M * 4 * outputs
    w.hbm.update({"rows": spec.L * spec.R * spec.D * e, "cols": spec.L * spec.C * spec.D * e,
                  "norm_tables": spec.L * (spec.R + spec.C) * spec.M * 4, "positives": spec.R * 4,
                  "statistics_out": spec.L * spec.R * spec.M * 4 * outputs})
    if spec.flag("COLUMN_STATS"):
        w.hbm["column_sums"] = spec.L * spec.flags["K"] * spec.M * 4
    if spec.flag("GUIDED"):
        w.notes.append("the guide's fp32 product per tile (CUDA cores) is not modelled")
    return w


def _backward_streamed(spec: Spec, block: int) -> int:
    """Tiles one backward work item streams (``_m2d_bwd_kernel``): dX over column tiles from c_start, dY over
    row tiles up to n_streamed (the triangle's bounds)."""
    if spec.kind == "backward_dY":
        n_streamed = spec.R
        if spec.flag("TRIANGLE"):
            n_streamed = min(n_streamed, min(block * spec.block_c + spec.block_c, spec.C) - 1)
        return _cdiv(max(0, n_streamed), spec.block_r)
    c_start = (block * spec.block_r + 1) // spec.block_c * spec.block_c if spec.flag("TRIANGLE") else 0
    return _cdiv(max(0, spec.C - c_start), spec.block_c)


def backward_launch(spec: Spec, slot_bytes: int = 4, l2_capacity: float = 50e6) -> Work:
    """One backward launch (``_m2d_bwd_kernel``): a persistent grid of ``programs`` over the work items (layer,
    owner block); per item the work rows are zeroed (``_zero_columns``), the tiles streamed (``_backward_tile``)
    and the gradient stored (``_store_gradient``: reads the owner's embeddings and work rows, writes the gradient
    and zeroes the columns above the top)."""
    for_cols = spec.kind == "backward_dY"
    br, bc, e = spec.block_r, spec.block_c, spec.element
    own = bc if for_cols else br
    n_own = spec.C if for_cols else spec.R
    n_blocks = _cdiv(n_own, own)
    w = Work(work_units=spec.L * n_blocks, persistent=True)
    streamed = [_backward_streamed(spec, b) for b in range(n_blocks)]
    teacher = spec.flag("TEACHER")
    t_top = spec.bounds[spec.n_seg[-1]]
    for layer in range(spec.L):
        n_seg, top, n_active = _layer(spec, layer)
        tiles = sum(streamed) if n_seg > 0 else 0
        w.tiles += tiles
        w.flops += tiles * 4 * br * bc * top * spec.products
        per_tile = backward_tile_l2(spec, top, n_active, slot_bytes)
        if teacher:
            per_tile["teacher_operands"] = (br + bc) * t_top * e + 2 * br * 4
            w.flops += tiles * 2 * br * bc * t_top * spec.products
        for term, value in per_tile.items():
            w.l2[term] += tiles * value
        if tiles and not w.per_tile_l2:
            w.per_tile_l2 = per_tile
        w.exps += tiles * br * bc * (n_active * (2 if spec.flag("COLUMN_STATS") else 1) + teacher)
        # Per work item: zero the work rows over [0, top); store the gradient over [0, top) and zero [top, D).
        w.l2["work_rows_zero"] += n_blocks * own * top * 4
        w.l2["gradient_store"] += n_blocks * own * (top * (e + 4) + spec.D * e)
        if not for_cols:
            w.l2["positives"] += n_blocks * own * 4
    scratch = spec.programs * (own * spec.D * 4 + (spec.M - 1) * br * bc * slot_bytes)
    w.scratch_bytes = scratch
    w.hbm.update({"rows": spec.L * spec.R * spec.D * e, "cols": spec.L * spec.C * spec.D * e,
                  "statistics": spec.L * spec.R * spec.M * 4 * 2,
                  "norm_tables": spec.L * (spec.R + spec.C) * spec.M * 4 + spec.L * n_own * spec.M * 4,
                  "positives": spec.R * 4, "gradient": spec.L * n_own * spec.D * e})
    if scratch <= l2_capacity:
        w.hbm["scratch_writeback"] = scratch  # dirty lines leave L2 at least once
    else:
        w.hbm["scratch"] = sum(w.l2[t] for t in ("slots", "work_rows", "work_rows_zero")) + w.l2["gradient_store"]
        w.notes.append(f"scratch {scratch / 1e6:.0f} MB exceeds the L2 ({l2_capacity / 1e6:.0f} MB): counted in HBM")
    return w


# ---------------------------------------------------------------------------------------
# SASS: loops, their roles and the dynamic instruction count
# ---------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
CATEGORIES = {"hgmma": ("HGMMA",), "hmma": ("HMMA",), "mufu_ex2": ("MUFU.EX2",), "bar": ("BAR.",),
              "wgmma_wait": ("WARPGROUP.DEPBAR",), "ldg": ("LDG.",), "ldgsts": ("LDGSTS",), "stg": ("STG.",),
              "red_atom": ("RED.", "ATOM")}


@dataclass
class Loop:
    start: int
    end: int
    direct: Counter = field(default_factory=Counter)  # category -> count, unconditional
    conditional: Counter = field(default_factory=Counter)
    rare: Counter = field(default_factory=Counter)  # the forward's positive extraction
    children: list = field(default_factory=list)
    role: str = ""

    def has_mma_direct(self):
        return (self.direct["hgmma"] + self.direct["hmma"] + self.conditional["hgmma"] + self.conditional["hmma"]) > 0

    def has_mma(self):
        return self.has_mma_direct() or any(child.has_mma() for child in self.children)


def _category_counts(opcode: str) -> list[str]:
    found = ["all"]
    for name, prefixes in CATEGORIES.items():
        if any(opcode.startswith(prefix) for prefix in prefixes):
            found.append(name)
    return found


def parse_sass(sass: str) -> list[tuple[int, bool, str, str]]:
    """(address, predicated, opcode, operands) of each instruction of the (single-kernel) SASS listing."""
    out = []
    for match in _LINE.finditer(sass):
        predicate = (match.group(2) or "").strip()
        out.append((int(match.group(1), 16), bool(predicate) and predicate != "@PT", match.group(3),
                    match.group(4)))
    return out


def loop_tree(sass: str, forward: bool) -> tuple[Counter, list[Loop]]:
    """(instructions outside every loop, the outermost loops) of a SASS listing, by category."""
    instructions = parse_sass(sass)
    exit_address = max((a for a, _, op, _ in instructions if op == "EXIT"), default=None)
    branches = []
    for address, predicated, opcode, operands in instructions:
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target:
                branches.append((address, int(target.group(1), 16), predicated))
    loops = {}
    for address, target, _ in branches:
        if target < address or (target == address and (exit_address is None or address < exit_address)):
            loops[target] = max(loops.get(target, address), address)
    ordered = sorted((Loop(start, end) for start, end in loops.items()), key=lambda lp: (lp.start, -lp.end))
    roots, stack = [], []
    for loop in ordered:
        while stack and not (stack[-1].start <= loop.start and loop.end <= stack[-1].end):
            stack.pop()
        (stack[-1].children if stack else roots).append(loop)
        stack.append(loop)

    def innermost(address):
        found, level = None, roots
        while True:
            inner = next((lp for lp in level if lp.start <= address <= lp.end), None)
            if inner is None:
                return found
            found, level = inner, inner.children

    # Skip regions: forward branches whose target stays inside the branch's innermost loop.
    regions = {}
    for address, target, _ in branches:
        loop = innermost(address)
        if loop is not None and address < target <= loop.end:
            regions.setdefault(id(loop), []).append((address + 16, target))
    mufu_regions = {}
    for address, _, opcode, _ in instructions:
        if opcode.startswith("MUFU.EX2"):
            loop = innermost(address)
            for lo, hi in regions.get(id(loop), []) if loop else []:
                if lo <= address < hi:
                    mufu_regions[(id(loop), lo, hi)] = True
    outside = Counter()
    for address, _, opcode, _ in instructions:
        if exit_address is not None and address > exit_address:
            continue  # the padding loop after the last EXIT
        loop = innermost(address)
        categories = _category_counts(opcode)
        if loop is None:
            outside.update(categories)
            continue
        spans = sorted(((lo, hi) for lo, hi in regions.get(id(loop), []) if lo <= address < hi),
                       key=lambda span: span[1] - span[0])
        if not spans:
            loop.direct.update(categories)
        elif forward and len(spans) >= 2 and not mufu_regions.get((id(loop), *spans[0])):
            loop.rare.update(categories)  # nested in the epilogue, no exponential: the positive's extraction
        else:
            loop.conditional.update(categories)
    return outside, roots


def assign_roles(roots: list[Loop], forward: bool) -> bool:
    """Name each loop's role (module docstring); True when the structure is the plain flat-k one (the forward's
    tile loop holds one k-loop, the backward's two)."""
    def visit(loop, depth_from_top):
        if loop.has_mma_direct():
            loop.role = "k"
        elif loop.has_mma():
            if depth_from_top == 0:
                loop.role = "tile" if forward else "work"
            elif depth_from_top == 1 and not forward:
                loop.role = "tile"
            else:
                loop.role = "segment"
        else:
            loop.role = "chunk"
        for child in loop.children:
            visit(child, depth_from_top + (1 if loop.has_mma() and not loop.has_mma_direct() else 0))

    for root in roots:
        visit(root, 0)
    tiles = [lp for root in roots for lp in _walk(root) if lp.role == "tile"]
    expected_k = 1 if forward else 2
    return len(tiles) == 1 and [child.role for child in tiles[0].children].count("k") == expected_k and all(
        child.role == "k" for child in tiles[0].children)


def _walk(loop):
    yield loop
    for child in loop.children:
        yield from _walk(child)


@dataclass
class SassAnalysis:
    """A kernel's SASS split into loops: instructions outside every loop, the loops, whether the loop structure
    is the verified plain one, and the cubin's registers, spill and shared memory."""

    outside: Counter
    roots: list
    exact: bool
    registers: int
    spill_bytes: int
    shared_bytes: int


def analyse(compiled, forward: bool) -> SassAnalysis:
    """The loop tree of a compiled kernel (``forward``: the forward kernel's roles)."""
    sass = sm90.cuobjdump(compiled.asm["cubin"], "-sass")
    outside, roots = loop_tree(sass, forward)
    exact = assign_roles(roots, forward)
    usage = sm90.inspect_cubin(compiled.asm["cubin"], compiled.metadata.shared)
    return SassAnalysis(outside, roots, exact, usage["registers"], usage["spill_bytes"], usage["shared_bytes"])


def dynamic_counts(analysis: SassAnalysis, spec: Spec) -> dict:
    """Dynamic instructions per thread (by category): per tile (averaged over the layers) and for the launch
    (summed over programs), from the loop tree and the trips the launch implies."""
    forward = spec.kind == "forward"
    total, per_tile_sum, tiles_total = Counter(), Counter(), 0
    for layer in range(spec.L):
        n_seg, top, _ = _layer(spec, layer)
        if n_seg == 0:
            continue
        chunks = top // spec.block_d if spec.flag("ALIGNED") else sum(
            _cdiv(spec.bounds[m + 1] - spec.bounds[m], spec.block_d) for m in range(n_seg))
        boundaries = n_seg if forward else max(0, n_seg - 1)
        if forward:
            tiles_per_unit = sum(_forward_tiles_per_block(spec, b) for b in range(_cdiv(spec.R, spec.block_r))) / max(
                1, _cdiv(spec.R, spec.block_r))
            units = _cdiv(spec.R, spec.block_r)  # programs of this layer
            positive_share = min(1.0, max(1.0, spec.block_r / spec.block_c) / max(1.0, spec.C / spec.block_c))
        else:
            own = spec.block_c if spec.kind == "backward_dY" else spec.block_r
            n_blocks = _cdiv(spec.C if spec.kind == "backward_dY" else spec.R, own)
            tiles_per_unit = sum(_backward_streamed(spec, b) for b in range(n_blocks)) / n_blocks
            units = n_blocks  # work items of this layer
            positive_share = 1.0

        trips = {"chunks": chunks, "n_seg": n_seg, "boundaries": boundaries, "tiles": tiles_per_unit,
                 "positive_share": positive_share, "tile_executions": units}
        layer_count = Counter()
        for root in analysis.roots:
            layer_count += _count(root, trips, per_tile_sum)
        total += _scaled(layer_count, units)
        tiles_total += units * tiles_per_unit
    total += _scaled(analysis.outside, spec.programs)
    return {"per_tile": {k: round(v / max(1, tiles_total), 1) for k, v in per_tile_sum.items()},
            "launch": {k: round(v) for k, v in total.items()}}


def _count(loop: Loop, trips: dict, per_tile_sum: Counter, inside_segment: bool = False) -> Counter:
    """Instructions of one execution of ``loop`` with the trips of its role (module docstring); a tile loop also
    adds its per-iteration body times ``tile_executions * tiles`` to ``per_tile_sum``."""
    chunks, n_seg = trips["chunks"], trips["n_seg"]
    if loop.role == "k":
        count = chunks / n_seg if inside_segment else chunks
        body = _scaled(loop.direct, count) + _scaled(loop.conditional, trips["boundaries"]) + _scaled(
            loop.rare, trips["boundaries"] * trips["positive_share"])
        count = 1  # (a k-loop holds no loop: nothing below is scaled by its trips)
    elif loop.role in ("tile", "work"):
        body = loop.direct + loop.conditional + loop.rare
        for child in loop.children:
            body += _count(child, trips, per_tile_sum)
        if loop.role == "work":
            return body  # one work item; the caller multiplies by the layer's items
        per_tile_sum.update(_scaled(body, trips["tile_executions"] * trips["tiles"]))
        return _scaled(body, trips["tiles"])
    else:
        if loop.role == "segment":
            count = n_seg
        else:  # chunk: around an inner chunk loop, the segments; else the chunks
            nested = any(child.role == "chunk" for child in loop.children)
            count = n_seg if nested else (chunks / n_seg if inside_segment else chunks)
        body = _scaled(loop.direct + loop.conditional + loop.rare, count)
    for child in loop.children:
        body += _scaled(_count(child, trips, per_tile_sum, inside_segment or loop.role in ("segment", "chunk")), count)
    return body


def _scaled(counter: Counter, factor: float) -> Counter:
    return Counter({k: v * factor for k, v in counter.items()})


# ---------------------------------------------------------------------------------------
# Resources and times
# ---------------------------------------------------------------------------------------


def resident_per_sm(spec: Spec, analysis: SassAnalysis | None) -> int:
    """Programs one SM holds at once: registers, shared memory and warps of the cubin (1 without it)."""
    if analysis is None:
        return 1
    threads = spec.warps * 32
    by_registers = REGISTER_FILE // max(1, analysis.registers * threads)
    by_shared = SHARED_PER_SM // max(1, analysis.shared_bytes) if analysis.shared_bytes else 32
    return max(1, min(by_registers, by_shared, 64 // spec.warps))


def occupancy(spec: Spec, work: Work, sms: int, per_sm: int) -> dict:
    if work.persistent:
        rounds = _cdiv(work.work_units, spec.programs)
        efficiency = work.work_units / (rounds * sms)
        return {"programs": spec.programs, "persistent": True, "work_items": work.work_units,
                "items_per_program": round(work.work_units / spec.programs, 2), "idle_sms": max(0, sms - spec.programs),
                "sm_efficiency": efficiency}
    slots = sms * per_sm
    waves = work.work_units / slots
    efficiency = work.work_units / (_cdiv(work.work_units, slots) * slots)
    return {"programs": spec.programs, "persistent": False, "resident_per_sm": per_sm, "waves": round(waves, 2),
            "idle_sms": max(0, sms - work.work_units), "sm_efficiency": efficiency}


def times_ms(flops, hbm, l2, exps, warp_instructions, efficiency, constants, tf32=False, launches=1) -> dict:
    """Each resource's time (ms) by the module docstring's formulas; issue None when not measured."""
    clock = constants["clock_ghz"] * 1e9
    sms = constants["sms"]
    tensor_rate = constants["tc_tflops"] * 1e12 * (0.5 if tf32 else 1.0)
    return {
        "tensor": flops / (tensor_rate * efficiency) * 1e3,
        "hbm": hbm / (constants["hbm_tbps"] * 1e12) * 1e3,
        "l2": l2 / (constants["l2_tbps"] * 1e12) * 1e3,
        "exp": exps / (constants["exp_per_clk"] * sms * clock * efficiency) * 1e3,
        "issue": None if warp_instructions is None else
        warp_instructions / (ISSUE_PER_CLK * sms * clock * efficiency) * 1e3,
        "launch": launches * constants["launch_us"] * 1e-3,
    }


def finish(row: dict) -> dict:
    """Binding resource and modelled time (max of the resources plus the launch overhead) of a row."""
    resources = {k: v for k, v in row["time_ms"].items() if k != "launch" and v is not None}
    row["binding"] = max(resources, key=resources.get)
    row["modelled_ms"] = resources[row["binding"]] + row["time_ms"]["launch"]
    return row


def model_spec(spec: Spec, constants: dict, analysis: SassAnalysis | None, slot_bytes: int = 4,
               name: str | None = None) -> dict:
    """The model's row of one launch."""
    if spec.kind == "forward":
        work = forward_launch(spec)
    else:
        work = backward_launch(spec, slot_bytes, constants["l2_mb"] * 1e6)
    per_sm = resident_per_sm(spec, analysis)
    occ = occupancy(spec, work, constants["sms"], per_sm)
    sass = {"measured": False, "reason": "--no-sass" if analysis is None else None}
    warp_instructions = None
    if analysis is not None:
        counts = dynamic_counts(analysis, spec)
        warp_instructions = counts["launch"]["all"] * spec.warps
        sass = {"measured": True, "method": "loops" if analysis.exact and plain(spec) else "estimate",
                "instructions_per_thread_per_tile": counts["per_tile"].get("all"),
                "per_tile": counts["per_tile"], "instructions_per_thread": counts["launch"]["all"],
                "warp_instructions": warp_instructions, "registers": analysis.registers,
                "spill_bytes": analysis.spill_bytes, "shared_bytes": analysis.shared_bytes}
    l2_total = sum(work.l2.values())
    hbm_total = sum(work.hbm.values())
    row = {
        "kernel": name or spec.kind,
        "tile": {"BLOCK_R": spec.block_r, "BLOCK_C": spec.block_c, "BLOCK_D": spec.block_d, "num_warps": spec.warps,
                 "num_stages": spec.stages},
        "rules": {k: v for k, v in spec.flags.items() if k in tc.RULE_FLAGS and v} or "plain",
        **occ,
        "tiles": work.tiles,
        "tensor_flops": work.flops,
        "hbm_bytes": {**dict(work.hbm), "total": hbm_total},
        "l2_bytes": {**dict(work.l2), "total": l2_total},
        "l2_bytes_per_tile": {**work.per_tile_l2, "total": sum(work.per_tile_l2.values())},
        "scratch_bytes": work.scratch_bytes,
        "exp2": work.exps,
        "sass": sass,
        "time_ms": times_ms(work.flops, hbm_total, l2_total, work.exps, warp_instructions, occ["sm_efficiency"],
                            constants, spec.tf32),
        "notes": work.notes,
    }
    return finish(row)


# ---------------------------------------------------------------------------------------
# Designs (not built): formulas at the same shape
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    L: int
    B: int
    N: int
    D: int
    dims: tuple
    element: int = 2


def two_phase(shape: Shape, t_mode: str, tile: tuple, constants: dict, phase1_issue_per_tile: float | None,
              gemm: str = "cublas", budget_mb: float | None = None) -> dict:
    """Two phases per layer and chunk of rows: (1) a Triton pass recomputes S per tile in the forward's order,
    forms W_m at each boundary, suffix-sums them (T_m kept per ``t_mode``) and writes H_m in bf16 to a
    ``[M, chunk, N]`` buffer; (2) per segment s, ``dX[:, seg_s] = H_s Y[:, seg_s]`` and ``dY[:, seg_s] +=
    H_s^T X[:, seg_s]`` as tensor-core GEMMs (``gemm``: cuBLAS, two launches per segment, or one grouped launch
    for all of a chunk's), then one elementwise pass per direction subtracts ``alpha X`` / ``beta Y``. H is
    ``chunk x N x M`` bf16 with ``chunk`` from the memory budget (``budget_mb``, else --memory-budget-mb); when
    H takes at most half the L2 the chunk's phases run back to back and H never reaches HBM. Returns the
    design's rows and assumptions."""
    L, B, N, D, dims, e = shape.L, shape.B, shape.N, shape.D, shape.dims, shape.element
    M, top = len(dims), dims[-1]
    br, bc = tile
    budget = (budget_mb or constants["memory_budget_mb"]) * 2**20
    chunk = min(B, int(budget // (N * M * 2)) // br * br)
    if chunk < br:
        raise ValueError(f"memory budget {budget / 2**20:.0f} MiB: H of one {br}-row block at N = {N} needs "
                         f"{br * N * M * 2 / 2**20:.0f} MiB")
    chunks = _cdiv(B, chunk)
    t_bytes = {"l2-fp32": 4, "h-bf16": 2, "regs-fp32": 4, "regs-bf16": 2}[t_mode]
    on_chip = t_mode.startswith("regs")
    registers_needed = br * bc * 4 + (M - 1) * br * bc * t_bytes if on_chip else br * bc * 4
    feasible = registers_needed <= constants["register_budget_kb"] * 1024
    tiles = L * _cdiv(B, br) * _cdiv(N, bc)
    # Per pair: rx, row max, log-sum and norm of the rows, ry and norm of the columns; the rows' and columns'
    # norm sums (alpha, beta) by fp32 atomics (a tile-parallel grid: no program owns a whole row or column).
    per_tile = {"operands": (br + bc) * top * e, "statistics": M * (4 * br + 2 * bc) * 4,
                "norm_sums_atomics": M * (br + bc) * 4 * 2, "h_write": M * br * bc * 2}
    if t_mode == "l2-fp32":
        per_tile["t_slots"] = 2 * (M - 1) * br * bc * 4
    elif t_mode == "h-bf16":
        per_tile["t_in_h"] = 2 * (M - 1) * br * bc * 2
    h_total = L * B * N * M * 2
    h_in_l2 = chunk * N * M * 2 <= constants["l2_mb"] * 1e6 / 2
    h_hbm = 0 if h_in_l2 else 1  # H's HBM traffic counted (1) or not (0)
    phase1_l2 = tiles * sum(per_tile.values())
    units = _cdiv(chunk, br) * _cdiv(N, bc)  # tiles of one launch (one program each)
    sms = constants["sms"]
    phase1_eff = units / (_cdiv(units, sms) * sms)
    phase1_hbm = L * (B + N) * D * e + L * (B + N) * M * 4 * 3 + h_total * h_hbm
    warps = 8
    issue = None if phase1_issue_per_tile is None else tiles * phase1_issue_per_tile * (br * bc) / (64 * 64) * warps
    phase1_launches = L * chunks * (2 if gemm == "grouped" else 1)  # grouped: its GEMM launch counted here
    rows = [finish({"kernel": "phase1_recompute_H", "launches": phase1_launches, "tile": {"BLOCK_R": br, "BLOCK_C": bc},
                    "tiles": tiles, "tensor_flops": tiles * 2 * br * bc * top,
                    "hbm_bytes": {"total": phase1_hbm, "H_write": h_total * h_hbm}, "l2_bytes": {"total": phase1_l2},
                    "l2_bytes_per_tile": {**per_tile, "total": sum(per_tile.values())},
                    "exp2": tiles * M * br * bc,
                    "sass": {"measured": False, "method": "estimate" if issue else None,
                             "basis": "today's backward dX per-tile count without its product loop, scaled by the "
                                      "tile's elements (8 warps)" if issue else "not modelled"},
                    "sm_efficiency": round(phase1_eff, 4),
                    "time_ms": times_ms(tiles * 2 * br * bc * top, phase1_hbm, phase1_l2, tiles * M * br * bc, issue,
                                        phase1_eff, constants, launches=phase1_launches)})]
    bm, bn = GEMM_TILE
    bounds = (0,) + tuple(dims)
    for s in range(M):
        w = bounds[s + 1] - bounds[s]
        h_read = L * B * N * 2  # H_s, chunk x N per chunk, all chunks and layers
        col_tiles = _cdiv(w, bn)
        launches = L * chunks if gemm == "cublas" else 0
        flops = 2 * L * B * N * w
        # dX rows of segment s: H_s read once per output column tile, Y_s once per output row tile.
        dx_l2 = col_tiles * h_read + L * chunks * _cdiv(chunk, bm) * N * w * e + L * B * w * e
        dx_hbm = h_read * h_hbm + L * chunks * N * w * e + L * B * w * e
        # dY of segment s: accumulated over the chunks in fp32 (read and written per chunk after the first).
        acc = L * N * w * 4 * (2 * chunks - 1) if chunks > 1 else L * N * w * e
        dy_l2 = col_tiles * h_read + L * chunks * _cdiv(N, bm) * chunk * w * e + acc
        dy_hbm = h_read * h_hbm + L * B * w * e + acc
        for name, l2, hbm in (("gemm_dX", dx_l2, dx_hbm), ("gemm_dY", dy_l2, dy_hbm)):
            rows.append(finish({"kernel": f"{name}_seg{s}", "launches": launches, "width": w, "tensor_flops": flops,
                                "hbm_bytes": {"total": hbm}, "l2_bytes": {"total": l2}, "exp2": 0,
                                "sass": {"measured": False, "method": None, "basis": "cuBLAS: not modelled"},
                                "time_ms": times_ms(flops, hbm, l2, 0, None, 1.0, constants, launches=launches)}))
    final = L * (B + N) * D * e * 3 + L * (B + N) * M * 4
    rows.append(finish({"kernel": "finalize_alpha_beta", "launches": 2 * L, "tensor_flops": 0,
                        "hbm_bytes": {"total": final}, "l2_bytes": {"total": final}, "exp2": 0,
                        "sass": {"measured": False, "method": None, "basis": "elementwise: not modelled"},
                        "time_ms": times_ms(0, final, final, 0, None, 1.0, constants, launches=2 * L)}))
    memory = chunk * N * M * 2 + (N * D * 4 if chunks > 1 else 0)
    assumptions = {
        "chunk_rows": chunk, "chunks_per_layer": chunks, "H_bytes": chunk * N * M * 2,
        "scratch_memory_bytes": memory, "memory_formula": "chunk * N * M * 2 (H) + N * D * 4 (dY accumulator when "
                                                          "chunks > 1); chunk = budget // (N * M * 2)",
        "T_m": {"l2-fp32": "fp32 per-program slots through L2 (as today), written and read once per tile",
                "h-bf16": "bf16 into H's own slots, then read back and overwritten with the suffix sums (rounds "
                          "each T_m to bf16 before the sum: not today's rounding)",
                "regs-fp32": "on chip in fp32 registers", "regs-bf16": "on chip in bf16 registers (rounds each "
                                                                       "T_m to bf16 before the sum)"}[t_mode],
        "registers_needed_bytes": registers_needed, "feasible": feasible,
        "feasibility": f"accumulator + (M - 1) T tiles <= --register-budget-kb {constants['register_budget_kb']:.0f}"
                       if on_chip else "no on-chip T",
        "H_traffic": "written once by phase 1, read by both GEMMs of each segment; " + (
            "H fits half the L2: the chunk's phases run back to back, no HBM traffic for H" if h_in_l2 else
            "through HBM (H exceeds half the L2)"),
        "gemm": ("cuBLAS, two launches per segment" if gemm == "cublas" else "one grouped Triton GEMM launch per "
                 "chunk (all segments, both directions)") + f"; {bm}x{bn} output tiles: H re-read once per output "
                 f"column tile, the other operand once per output row tile; tensor cores at --tc-tflops (no "
                 f"efficiency loss for narrow segments); its issue not modelled",
        "phase1_statistics": "rows' rx, max, log-sum, norm per pair per tile; columns' ry and norm; column norm "
                             "sums by fp32 atomics",
        "exact_h": "H_m = sum_{m' >= s} W_m' rounded to bf16 once (today's rounding) unless T_m is bf16",
    }
    return {"rows": rows, "assumptions": assumptions, "feasible": feasible}


def in_place_spec(spec: Spec, sms: int) -> Spec:
    """Today's backward launch streaming 128-wide tiles (BLOCK_C for dX, BLOCK_R for dY) with bf16 slots; the
    owner block stays 64 and the programs fill the same scratch budget (work rows + bf16 slots per program)."""
    tiles = {"block_c": 128} if spec.kind == "backward_dX" else {"block_r": 128}
    wide = replace(spec, **tiles)
    own = 64
    per_program = own * spec.D * 4 + (spec.M - 1) * wide.block_r * wide.block_c * 2
    return replace(wide, programs=max(1, min(sms, tc.SCRATCH_BUDGET // per_program)))


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def record(shape: Shape, dtype: str, symmetric: bool, case: str | None):
    """The recorded launches of one forward and backward (the public function on CPU tensors)."""
    if case is not None:
        chosen = next(c for c in sm90.CASES if c.name == case)
    else:
        chosen = sm90.Case("cli", (shape.L, shape.B, shape.N, shape.D, tuple(shape.dims)),
                           {"symmetric": True} if symmetric else {})
    return sm90.case_launches(chosen, sm90.DTYPES[dtype], random=False)


def analyse_launch(launch, cache: dict) -> SassAnalysis | None:
    """The SASS analysis of ``launch``'s specialisation, compiled once (``cache`` by kernel and meta-parameters;
    Triton's own cache keeps the cubin across runs)."""
    key = (launch.kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in launch.kwargs.items())))
    if key not in cache:
        result = sm90.compile_as_launched(launch)
        if result.kernel is None:
            print(f"warning: {key[0]} did not compile: {result.error}", file=sys.stderr)
            cache[key] = None
        else:
            cache[key] = analyse(result.kernel, launch.kernel.fn.__name__ == "_m2d_fwd_kernel")
    return cache[key]


def summarise(rows) -> dict:
    forward = sum(r["modelled_ms"] for r in rows if r["kernel"].startswith("forward"))
    backward = sum(r["modelled_ms"] for r in rows if not r["kernel"].startswith("forward"))
    return {"forward_ms": forward, "backward_ms": backward, "total_ms": forward + backward,
            "forward_flops": sum(r["tensor_flops"] for r in rows if r["kernel"].startswith("forward")),
            "backward_flops": sum(r["tensor_flops"] for r in rows if not r["kernel"].startswith("forward"))}


def build_designs(names, shape, constants, today_specs, analyses, launches) -> list[dict]:
    """The designs' entries: rows, totals, assumptions (module docstring)."""
    designs, skipped = [], []
    forward_spec = next(s for s in today_specs if s.kind == "forward")
    forward_launch_ = next(launch for launch, s in zip(launches, today_specs) if s.kind == "forward")
    layer_programs = forward_spec.programs // _cdiv(forward_spec.R, forward_spec.block_r)  # grid (row blocks, L)
    big_grid = (_cdiv(forward_spec.R, 128), layer_programs)
    big = replace(forward_spec, block_r=128, block_c=128, warps=8, stages=3, programs=math.prod(big_grid))
    big_analysis = None
    if analyses is not None:  # the same kernel compiled at the 128x128 config, as the autotuner would launch it
        big_launch = sm90.Launch(forward_launch_.kernel, forward_launch_.args,
                                 {**forward_launch_.kwargs, "BLOCK_R": 128, "BLOCK_C": 128, "num_warps": 8,
                                  "num_stages": 3}, big_grid)
        big_analysis = analyse_launch(big_launch, analyses)
    big_forward = [model_spec(big, constants, big_analysis, name="forward")]
    today_rows = [model_spec(s, constants, analyses_of(analyses, launch), name=s.kind)
                  for s, launch in zip(today_specs, launches)]
    today_backward = [r for r in today_rows if not r["kernel"].startswith("forward")]
    phase1_issue = phase1_issue_estimate(today_specs, analyses, launches)
    for name in names:
        if name == "today":
            entry = {"rows": today_rows, "assumptions": {"source": "the recorded launches, as modelled above"}}
        elif name == "forward-128x128":
            entry = {"rows": big_forward + today_backward,
                     "assumptions": {"forward": "today's forward kernel at BLOCK_R = BLOCK_C = 128, 8 warps, 3 stages "
                                                "(compiled: see its sass row for spills)",
                                     "backward": "today's"}}
        elif name == "in-place-128":
            rows = [model_spec(in_place_spec(s, constants["sms"]), constants, None, slot_bytes=2, name=s.kind)
                    for s in today_specs if s.kind != "forward"]
            entry = {"rows": big_forward + rows,
                     "assumptions": {"backward": "today's loops with a 128-wide streamed tile and bf16 slots; "
                                                 "asynchronous wgmma not modelled (issue not measured)",
                                     "forward": "forward-128x128"}}
        elif name.startswith("two-phase:"):
            t_mode, tile, gemm, budget = parse_two_phase(name)
            try:
                result = two_phase(shape, t_mode, tile, constants, phase1_issue, gemm, budget)
            except ValueError as error:  # H of one row block exceeds the design's budget at this shape
                skipped.append({"design": name, "reason": str(error)})
                continue
            entry = {"rows": big_forward + result["rows"],
                     "assumptions": {**result["assumptions"], "forward": "forward-128x128"},
                     "feasible": result["feasible"]}
        else:
            raise ValueError(f"--design {name!r}: unknown (see --help)")
        entry = {"design": name, **summarise(entry["rows"]), "feasible": entry.get("feasible", True), **entry}
        designs.append(entry)
    return designs, skipped


def phase1_issue_estimate(specs, analyses, launches) -> float | None:
    """Instructions per thread per 64x64 tile of a two-phase pass 1, estimated from today's dX SASS without its
    product loop (the recompute, the slot stores and the top gradient); None without SASS or a plain dX."""
    found = [(spec, launch) for spec, launch in zip(specs, launches) if spec.kind == "backward_dX"]
    if analyses is None or not found:
        return None
    spec, launch = found[0]
    analysis = analyses_of(analyses, launch)
    if analysis is None or not analysis.exact or (spec.block_r, spec.block_c) != (64, 64):
        return None
    return _without_product_loop(analysis, spec)


def analyses_of(analyses, launch):
    return None if analyses is None else analyse_launch(launch, analyses)


def _without_product_loop(analysis: SassAnalysis, spec: Spec) -> float:
    """Per-tile instructions of today's dX without its downward product k-loop (the last k-loop of the tile)."""
    tile = next(lp for root in analysis.roots for lp in _walk(root) if lp.role == "tile")
    product = [child for child in tile.children if child.role == "k"][-1]
    counts = dynamic_counts(analysis, spec)["per_tile"]["all"]
    n_seg, top, _ = _layer(spec, 0)
    chunks = top // spec.block_d
    return counts - (product.direct["all"] * chunks + product.conditional["all"] * max(0, n_seg - 1))


ALL_DESIGNS = ("today", "forward-128x128", "in-place-128") + tuple(
    f"two-phase:{t}:{r}x{c}" for t in TWO_PHASE_T for r, c in TWO_PHASE_TILES) + tuple(
    f"two-phase:{t}:{tile}:grouped:20" for t, tile in (("l2-fp32", "128x128"), ("h-bf16", "128x128"),
                                                       ("regs-fp32", "64x64"), ("regs-bf16", "64x128")))


def parse_two_phase(name: str) -> tuple:
    """``two-phase:<T>:<tile>[:<gemm>[:<budget MiB>]]`` -> (T, (rows, cols), gemm, budget or None)."""
    parts = name.split(":")
    if len(parts) < 3 or len(parts) > 5 or parts[0] != "two-phase" or parts[1] not in TWO_PHASE_T:
        raise ValueError(f"--design {name!r}: expected two-phase:<{'|'.join(TWO_PHASE_T)}>:<RxC>[:<cublas|grouped>"
                         f"[:<budget MiB>]]")
    try:
        tile = tuple(int(v) for v in parts[2].split("x"))
        budget = float(parts[4]) if len(parts) == 5 else None
    except ValueError:
        raise ValueError(f"--design {name!r}: the tile is RxC (e.g. 64x128), the budget a number of MiB") from None
    gemm = parts[3] if len(parts) >= 4 else "cublas"
    if len(tile) != 2 or min(tile) < 16 or gemm not in ("cublas", "grouped") or (budget is not None and budget <= 0):
        raise ValueError(f"--design {name!r}: tile RxC of at least 16, gemm cublas or grouped, a positive budget")
    return parts[1], tile, gemm, budget


def run(args) -> dict:
    constants = {name: getattr(args, name) for name in DEFAULTS}
    constants["sms"] = int(constants["sms"])
    shape = Shape(args.L, args.B, args.N, args.D, tuple(args.dims), 4 if args.dtype == "fp32" else 2)
    if args.case:
        case = next(c for c in sm90.CASES if c.name == args.case)
        shape = Shape(*case.shape, element=shape.element)
    sm90.SMS = constants["sms"]  # the recorded launcher sizes its persistent grid by the SMs (sm90_report)
    launches = record(shape, args.dtype, args.symmetric, args.case)
    specs = [spec_of(launch) for launch in launches]
    analyses = None if args.no_sass else {}
    rows = []
    for index, (spec, launch) in enumerate(zip(specs, launches)):
        row = model_spec(spec, constants, analyses_of(analyses, launch), name=spec.kind)
        rows.append({"launch": index, **row})
    out = {"kernels": rows, **summarise(rows)}
    out["assumptions"] = {
        **constants, "issue_per_clk_per_sm": ISSUE_PER_CLK,
        "shape": {"L": shape.L, "B": shape.B, "N": shape.N, "D": shape.D, "dims": list(shape.dims),
                  "dtype": args.dtype, "symmetric": args.symmetric, "case": args.case},
        "triton": sm90.triton.__version__, "target": "sm_90 (compiled without a GPU)" if analyses is not None else None,
        "model": "no GPU run: every figure is modelled from the kernels' loops and (unless --no-sass) their SASS",
        "hbm": "compulsory traffic: inputs, outputs and statistics once; scratch once unless it exceeds --l2-mb",
        "l2": "every global access of the tile loops (streamed operands assumed to hit L2)",
        "not_modelled": "latency (waits on each HGMMA, barriers), L2 misses of the streamed operands, spills' "
                        "local memory traffic, the guide's fp32 product",
    }
    if args.design:
        names = ALL_DESIGNS if "all" in args.design else tuple(args.design)
        out["designs"], out["designs_skipped"] = build_designs(names, shape, constants, specs, analyses, launches)
        if args.targets:
            out["targets"] = targets(out["designs"], shape, constants, specs, analyses, launches)
            out["targets_criteria"] = ("meets: feasible, total_ms <= 12 at --l2-tbps 7 and <= 15 at 5.5, backward "
                                       "FLOPs <= 3x the forward's, B = N = 65536 under 1000 ms within the budget")
    return out


def targets(designs, shape, constants, specs, analyses, launches) -> list[dict]:
    """Per design: total_ms at --l2-tbps 7 and 5.5, backward/forward FLOPs, and (two-phase) B = N = 65536."""
    names = [d["design"] for d in designs]
    slow = build_designs(names, shape, {**constants, "l2_tbps": 5.5}, specs, analyses, launches)[0]
    fast = build_designs(names, shape, {**constants, "l2_tbps": 7.0}, specs, analyses, launches)[0]
    big = Shape(shape.L, 65536, 65536, shape.D, shape.dims, shape.element)
    out = []
    for quick, slow_entry in zip(fast, slow):
        ratio = quick["backward_flops"] / quick["forward_flops"]
        entry = {"design": quick["design"], "feasible": quick["feasible"], "total_ms_l2_7": quick["total_ms"],
                 "total_ms_l2_5.5": slow_entry["total_ms"], "backward_over_forward_flops": round(ratio, 3)}
        if quick["design"].startswith("two-phase:"):
            t_mode, tile, gemm, budget = parse_two_phase(quick["design"])
            try:
                result = two_phase(big, t_mode, tile, constants, phase1_issue_estimate(specs, analyses, launches),
                                   gemm, budget)
            except ValueError as error:
                entry["b65536_ms"], entry["b65536_note"] = None, str(error)
            else:
                forward = [r for r in quick["rows"] if r["kernel"].startswith("forward")]
                scale = (big.B * big.N) / (shape.B * shape.N)  # the forward's work scales with B x N, same tiles
                b_ms = sum(r["modelled_ms"] for r in result["rows"]) + sum(r["modelled_ms"] for r in forward) * scale
                entry["b65536_ms"] = round(b_ms, 1)
                entry["b65536_scratch_bytes"] = result["assumptions"]["scratch_memory_bytes"]
                entry["b65536_note"] = ("two-phase rows at B = N = 65536; the forward's rows scaled by B x N from "
                                        "this shape (same tiles)")
        entry.setdefault("b65536_ms", None)  # today's kernels there: run the model at --B 65536 --N 65536
        entry["meets"] = bool(quick["feasible"] and quick["total_ms"] <= 12 and slow_entry["total_ms"] <= 15
                              and ratio <= 3 + 1e-9 and (entry["b65536_ms"] or 1e9) < 1000)
        out.append(entry)
    return out


def print_table(out: dict) -> None:
    head = (f"{'#':>2} {'kernel':<13} {'tile':<14} {'progs':>5} {'eff':>5} {'TFLOP':>7} {'HBM GB':>7} {'L2 GB':>7} "
            f"{'exp2 e9':>7} {'instr/tile':>10} | {'tensor':>6} {'HBM':>6} {'L2':>6} {'exp':>6} {'issue':>6} ms "
            f"| bound  model ms")
    print(head)
    for row in out["kernels"]:
        t, tm = row["tile"], row["time_ms"]
        issue = "n/m" if tm["issue"] is None else f"{tm['issue']:.2f}"
        per_tile = row["sass"].get("instructions_per_thread_per_tile") or "n/m"
        tile = f"{t['BLOCK_R']}x{t['BLOCK_C']}/{t['num_warps']}w/{t['num_stages']}s"
        print(f"{row['launch']:>2} {row['kernel']:<13} {tile:<14} {row['programs']:>5} {row['sm_efficiency']:>5.2f} "
              f"{row['tensor_flops'] / 1e12:>7.3f} {row['hbm_bytes']['total'] / 1e9:>7.2f} "
              f"{row['l2_bytes']['total'] / 1e9:>7.1f} {row['exp2'] / 1e9:>7.2f} {per_tile!s:>10} | "
              f"{tm['tensor']:>6.2f} {tm['hbm']:>6.2f} {tm['l2']:>6.2f} {tm['exp']:>6.2f} {issue:>6} ms | "
              f"{row['binding']:<6} {row['modelled_ms']:.2f}")
    print(f"forward {out['forward_ms']:.2f} ms, backward {out['backward_ms']:.2f} ms, total {out['total_ms']:.2f} ms "
          f"(modelled; no GPU run)")
    for design in out.get("designs", []):
        print(f"design {design['design']:<28} forward {design['forward_ms']:>7.2f}  "
              f"backward {design['backward_ms']:>7.2f}  total {design['total_ms']:>7.2f} ms"
              f"{'' if design['feasible'] else '  (infeasible: registers)'}")
        for row in design["rows"]:
            tm = row["time_ms"]
            print(f"    {row['kernel']:<22} {row['binding']:<6} {row['modelled_ms']:>8.3f} ms  "
                  f"(tensor {tm['tensor']:.3f}, HBM {tm['hbm']:.3f}, L2 {tm['l2']:.3f}, exp {tm['exp']:.3f}, issue "
                  f"{'n/m' if tm['issue'] is None else round(tm['issue'], 3)})")
    for entry in out.get("designs_skipped", []):
        print(f"design {entry['design']:<28} skipped: {entry['reason']}")
    for entry in out.get("targets", []):
        print(f"target {entry['design']:<28} {entry['total_ms_l2_7']:>7.2f} ms @7 TB/s, "
              f"{entry['total_ms_l2_5.5']:>7.2f} @5.5, bwd/fwd FLOPs {entry['backward_over_forward_flops']}, B=65536 "
              f"{entry.get('b65536_ms', 'n/a')} ms: {'MEETS' if entry['meets'] else 'no'}")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _dims(text):
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims) or list(dims) != sorted(set(dims)):
        raise argparse.ArgumentTypeError(f"expected increasing positive integers, got {text!r}")
    return dims


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    w = sm90.WORKED_EXAMPLE
    p.add_argument("--L", type=_positive(int), default=w["L"], help="layers (default %(default)s)")
    p.add_argument("--B", type=_positive(int), default=w["B"], help="queries (default %(default)s)")
    p.add_argument("--N", type=_positive(int), default=w["N"], help="documents (default %(default)s)")
    p.add_argument("--D", type=_positive(int), default=w["D"], help="features (default %(default)s)")
    p.add_argument("--dims", type=_dims, default=w["dims"], help="nested dims, comma-separated (default 32,...,768)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--symmetric", action="store_true", help="both directions (query_to_doc and doc_to_query)")
    p.add_argument("--case", choices=[c.name for c in sm90.CASES], help="one of sm90_report's cases instead")
    p.add_argument("--no-sass", action="store_true", help="skip the sm_90 compile: the issue row is not measured")
    p.add_argument("--design", action="append", metavar="NAME",
                   help="model a candidate design (repeatable; 'all' for every one): " + ", ".join(ALL_DESIGNS))
    p.add_argument("--targets", action="store_true", help="with --design: the targets per design (docs/gpu_model.md)")
    p.add_argument("--json", type=Path, help="write the model here (atomically)")
    for name, value in DEFAULTS.items():
        kind = int if name == "sms" else float
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=_positive(kind), default=value,
                       help=f"default {value}")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.D < args.dims[-1]:
        parser().error(f"--dims: the largest dim {args.dims[-1]} exceeds --D {args.D}")
    if args.targets and not args.design:
        parser().error("--targets: needs --design (the designs to check)")
    if args.design:
        for name in args.design:
            if name.startswith("two-phase"):
                try:
                    parse_two_phase(name)
                except ValueError as error:
                    parser().error(str(error))
            elif name != "all" and name not in ALL_DESIGNS:
                parser().error(f"--design: unknown design {name!r}; choose from all, {', '.join(ALL_DESIGNS)}")
    if not args.no_sass and (not sm90.tool("cuobjdump").exists() or not sm90.tool("ptxas").exists()):
        print("ptxas/cuobjdump not found in triton's backends/nvidia/bin: use --no-sass", file=sys.stderr)
        return 2
    out = run(args)
    print_table(out)
    if args.json:
        atomic_write(args.json, lambda file: file.write((json.dumps(out, indent=1) + "\n").encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
