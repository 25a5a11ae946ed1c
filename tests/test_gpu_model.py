"""benchmarks/gpu_model.py, the GPU cost model: its byte counts against hand counts from the kernels' loops, its JSON,
its constants, and its SASS loop counting on a hand-written listing. Runs without a GPU and without compiling
(``--no-sass``): the launches are recorded from the public function on CPU tensors."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# L = 2, B = N = 128, D = 64, dims (32, 64), bf16: the launcher picks a 64x128 forward tile and 64x64 backward tiles
# (the first configs the size class fills), BLOCK_D = 32 (the widest of 64/32/16 dividing every dim).
SMALL = ["--L", "2", "--B", "128", "--N", "128", "--D", "64", "--dims", "32,64", "--no-sass"]


def _model(tmp_path, *extra, sass=False):
    out = tmp_path / f"model{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    flags = [flag for flag in SMALL if flag != "--no-sass"] if sass else SMALL
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_model.py"), *flags, *extra,
                             "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("gpu_model"))[0]


def test_json_has_the_documented_keys(small):
    assert {"kernels", "forward_ms", "backward_ms", "total_ms", "assumptions"} <= set(small)
    assert [row["kernel"] for row in small["kernels"]] == ["forward", "backward_dX", "backward_dY"]
    for row in small["kernels"]:
        assert {"tile", "programs", "sm_efficiency", "tensor_flops", "hbm_bytes", "l2_bytes", "exp2", "sass",
                "time_ms", "binding", "modelled_ms"} <= set(row)
        assert set(row["time_ms"]) == {"tensor", "hbm", "l2", "exp", "issue", "launch"}
        assert row["sass"]["measured"] is False and row["time_ms"]["issue"] is None  # --no-sass: not measured
        resources = {k: v for k, v in row["time_ms"].items() if k not in ("launch", "issue")}
        assert row["binding"] == max(resources, key=resources.get)
        assert row["modelled_ms"] == pytest.approx(max(resources.values()) + row["time_ms"]["launch"], abs=1e-3)
    assert small["total_ms"] == pytest.approx(small["forward_ms"] + small["backward_ms"], abs=1e-3)
    assert small["assumptions"]["l2_tbps"] == 7.0 and small["assumptions"]["sms"] == 132


def test_backward_tile_bytes_match_a_hand_count(small):
    """dX launch, 64x64 tile, top = 64 (two 32-wide chunks), both pairs active, bf16."""
    dx = next(row for row in small["kernels"] if row["kernel"] == "backward_dX")
    assert dx["tile"] == {"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2}
    recompute = (64 + 64) * 64 * 2     # _accumulate_chunk: X and Y chunks over [0, 64), bf16
    slots = 2 * (64 * 64 * 4)          # _store_slot writes W_0 (fp32), _add_slot reads it back; W_1 stays in registers
    product = 64 * 64 * 2              # _product_chunk reloads Y's chunks for H Y
    work = 2 * (64 * 64 * 4)           # _product_chunk loads and stores the fp32 work rows, every chunk
    statistics = 2 * (5 * 64 * 4)      # _weighted_gradient per pair: rx, ry, row max, log-sum, the rows' norm factor
    tile = recompute + slots + product + work + statistics
    assert tile == 92672
    assert dx["l2_bytes_per_tile"]["total"] == tile
    # Launch: L * R / 64 = 4 work items of C / 64 = 2 tiles; per item the work rows zeroed (_zero_columns), the
    # gradient stored (_store_gradient: own rows bf16 and work rows fp32 read, gradient bf16 written), positives.
    per_item = 64 * 64 * 4 + (64 * 64 * 2 + 64 * 64 * 4 + 64 * 64 * 2) + 64 * 4
    assert dx["tiles"] == 8 and dx["work_items"] == 4 and dx["programs"] == 4
    assert dx["l2_bytes"]["total"] == 8 * tile + 4 * per_item == 939008
    # HBM: both embeddings, the gradient, the statistics and norm tables once; the scratch (4 programs' work rows
    # and one slot each) written back once.
    embeddings = 2 * 128 * 64 * 2
    tables = 2 * (2 * 128 * 2 * 4) + 2 * 256 * 2 * 4 + 2 * 128 * 2 * 4  # max, log-sum; rx, ry; norm factors
    scratch = 4 * (64 * 64 * 4 + 64 * 64 * 4)
    assert dx["hbm_bytes"]["total"] == 3 * embeddings + tables + 128 * 4 + scratch
    assert dx["tensor_flops"] == 8 * 4 * 64 * 64 * 64  # recompute and product: 2 * 64 * 64 * top each
    assert dx["exp2"] == 8 * 2 * 64 * 64  # one exp2 per entry and active pair


def test_forward_tile_bytes_match_a_hand_count(small):
    forward = small["kernels"][0]
    assert (forward["tile"]["BLOCK_R"], forward["tile"]["BLOCK_C"]) == (64, 128)
    operands = (64 + 128) * 64 * 2  # _accumulate_chunk: X[64 rows] and Y[128 cols] over [0, 64)
    norms = 2 * (64 + 128) * 4      # _pair_logits per active pair: the rows' and columns' inverse norms
    assert forward["l2_bytes_per_tile"]["total"] == operands + norms
    # 2 row blocks x 2 layers = 4 programs of one tile; positives per program; max, log-sum and loss tables out.
    assert forward["l2_bytes"]["total"] == 4 * (operands + norms) + 4 * 64 * 4 + 3 * 2 * 128 * 2 * 4
    assert forward["tensor_flops"] == 4 * 2 * 64 * 128 * 64


def test_constants_change_the_times_they_should(tmp_path, small):
    fast, _ = _model(tmp_path, "--l2-tbps", "14", "--hbm-tbps", "8.6")
    for slow_row, fast_row in zip(small["kernels"], fast["kernels"]):
        assert fast_row["time_ms"]["l2"] == pytest.approx(slow_row["time_ms"]["l2"] / 2, rel=1e-3)
        assert fast_row["time_ms"]["hbm"] == pytest.approx(slow_row["time_ms"]["hbm"] / 2, rel=1e-3)
        assert fast_row["time_ms"]["tensor"] == slow_row["time_ms"]["tensor"]
        assert fast_row["l2_bytes"] == slow_row["l2_bytes"]
    assert fast["assumptions"]["l2_tbps"] == 14.0


SASS = """
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   MOV R1, RZ ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0040*/               @P1 BRA 0x70 ;
        /*0050*/                   MUFU.EX2 R3, R3 ;
        /*0060*/                   FADD R4, R4, R3 ;
        /*0070*/                   ISETP.NE.AND P2, PT, R2, R5, PT ;
        /*0080*/               @P2 BRA 0x30 ;
        /*0090*/                   FMUL R6, R6, R6 ;
        /*00a0*/                   ISETP.NE.AND P3, PT, R2, R7, PT ;
        /*00b0*/               @P3 BRA 0x20 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0;
"""


@pytest.fixture
def gpu_model(monkeypatch):
    """The module itself (benchmarks/ on the path); sm90_report drops TRITON_INTERPRET at import: put it back."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    saved = os.environ.get("TRITON_INTERPRET")
    module = importlib.import_module("gpu_model")
    if saved is not None:
        os.environ["TRITON_INTERPRET"] = saved
    return module


def test_sass_loop_counting_on_a_hand_written_listing(gpu_model):
    """A tile loop [0x20, 0xb0] around a k-loop [0x30, 0x80] whose epilogue (0x50, 0x60) is skipped by a forward
    branch: per tile 4 tile-loop instructions + 2 chunks x 4 k-loop ones + 2 boundaries x 2 epilogue ones = 16; the
    launch adds the 3 outside every loop (the padding branch after EXIT is not code)."""
    outside, roots = gpu_model.loop_tree(SASS, forward=True)
    assert gpu_model.assign_roles(roots, forward=True)
    analysis = gpu_model.SassAnalysis(outside, roots, True, 128, 0, 0)
    spec = gpu_model.Spec("forward", L=1, R=64, C=256, D=64, bounds=(0, 32, 64), n_seg=(2,), active=((True, True),),
                          element=2, block_r=64, block_c=128, block_d=32, warps=4, stages=3, programs=1,
                          flags={"ALIGNED": True})
    counts = gpu_model.dynamic_counts(analysis, spec)
    assert counts["per_tile"]["all"] == 16
    assert counts["per_tile"]["hgmma"] == 2 and counts["per_tile"]["mufu_ex2"] == 2
    assert counts["launch"]["all"] == 2 * 16 + 3


def test_two_phase_design_flops_and_memory_budget(gpu_model):
    """The two-phase design: pass 1 recomputes S once (2 L B N top), the GEMMs take 2 L B N w_s per segment and
    direction (4 L B N top in all): 3x the forward's 2 L B N top; H (chunk x N x M bf16) stays within the budget."""
    constants = {**gpu_model.DEFAULTS, "memory_budget_mb": 256.0}
    for batch in (512, 8192, 65536):
        shape = gpu_model.Shape(L=3, B=batch, N=batch, D=96, dims=(32, 64, 96))
        design = gpu_model.two_phase(shape, "regs-bf16", (64, 64), constants, None)
        flops = sum(row["tensor_flops"] for row in design["rows"])
        assert flops == 3 * (2 * 3 * batch * batch * 96)
        assert design["assumptions"]["H_bytes"] <= 256 * 2**20
        assert design["assumptions"]["chunk_rows"] == min(batch, 256 * 2**20 // (batch * 3 * 2) // 64 * 64)


BAD_FLAGS = [(["--l2-tbps", "0"], "--l2-tbps"), (["--dims", "64,32"], "--dims"), (["--D", "32"], "--dims"),
             (["--design", "two-phase:nowhere:64x64"], "--design"), (["--design", "fastest"], "--design")]


@pytest.mark.parametrize("flags, name", BAD_FLAGS)
def test_bad_flags_are_named(gpu_model, capsys, flags, name):
    with pytest.raises(SystemExit) as exit_:
        gpu_model.main([*SMALL, *flags])
    assert exit_.value.code == 2 and name in capsys.readouterr().err


def test_sass_counts_of_the_real_cubins(tmp_path):
    """The small shape's three kernels compiled for sm_90 (no GPU): the loop structure is recognised ("loops") and
    the dynamic counts per tile match a hand count. Exponentials: one MUFU.EX2 per entry and active pair, spread
    over the threads (forward 64x128 over 128 threads, backward 64x64 over 256, 2 pairs). Tensor-core
    instructions: the forward's 64x128 tile takes one HGMMA.64x128x16 per 16 of k, 2 per 32-wide chunk, 2 chunks;
    the backward's two warpgroups take one HGMMA.64x32x16 each per 16 of k in the recompute (2 per chunk) and one
    HGMMA.64x16x16 per 16 of the tile's 64 columns in the product (4 per chunk), 2 chunks each."""
    from m2d_kernels.backends import triton_kernels as tk

    nvidia_bin = Path(tk.triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (nvidia_bin / "ptxas").exists() or not (nvidia_bin / "cuobjdump").exists():
        pytest.skip("ptxas/cuobjdump not shipped with this triton")
    model, _ = _model(tmp_path, sass=True)
    expected = {"forward": (128, 4), "backward_dX": (32, 12), "backward_dY": (32, 12)}
    for row in model["kernels"]:
        sass = row["sass"]
        assert sass["measured"] and sass["method"] == "loops", row["kernel"]
        assert (sass["per_tile"]["mufu_ex2"], sass["per_tile"]["hgmma"]) == expected[row["kernel"]], row["kernel"]
        assert row["time_ms"]["issue"] > 0
        warps = row["tile"]["num_warps"]
        assert sass["warp_instructions"] == sass["instructions_per_thread"] * warps
