"""benchmarks/gpu.sh and its parts, on the CPU: the script's checks before any GPU work, the stages' test
selections (collected by pytest in subprocesses), the time budget, the worked example without CUDA and the
summary of synthetic stage outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
# Collects benchmarks/test_bench_gpu.py as on a GPU (the module skips itself without one); nothing runs.
FAKE_CUDA = "import sys, torch; torch.cuda.is_available = lambda: True; import pytest; sys.exit(pytest.main())"


@pytest.fixture(scope="module")
def stages():
    """benchmarks/gpu_stages.py, with benchmarks/ on sys.path meanwhile (gpu_summary imports it so)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_stages

        yield gpu_stages
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _env():
    """This interpreter first on PATH (gpu.sh calls ``python``) and the repository on PYTHONPATH."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _run(command, **kwargs):
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def collected(stages):
    """{name: collected node ids}: stage a's selection, stage c's, every triton test (tests/test_triton.py and
    the triton cases of the pass grid) and all of benchmarks/test_bench_gpu.py, collected side by side."""
    options = ["--collect-only", "-q", "-p", "no:cacheprovider"]
    commands = {
        "a": [sys.executable, "-m", "pytest", *options, *stages.selection("a")],
        "c": [sys.executable, "-m", "pytest", *options, *stages.selection("c")],
        "triton": [sys.executable, "-m", "pytest", *options, stages.TRITON_TESTS, stages.PASS_TESTS, "-k", "triton"],
        "bench": [sys.executable, "-c", FAKE_CUDA, *options, stages.GPU_BENCHMARKS],
    }
    running = {name: subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
               for name, command in commands.items()}
    ids = {}
    for name, process in running.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"collecting {name}: exit {process.returncode}\n{output[-3000:]}"
        ids[name] = [line for line in output.splitlines() if "::" in line and not line.startswith(" ")]
        assert ids[name], f"collecting {name} found no tests\n{output[-3000:]}"
    return ids


def test_gpu_sh_is_valid_bash():
    result = _run(["bash", "-n", str(GPU_SH)])
    assert result.returncode == 0, result.stderr


@NO_CUDA
def test_gpu_sh_without_cuda_exits_1_and_writes_nothing(tmp_path):
    watched = [ROOT, ROOT / "benchmarks", ROOT / "benchmarks" / "results"]
    before = {path: sorted(os.listdir(path)) for path in watched}
    result = _run(["bash", str(GPU_SH), str(tmp_path / "out")])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "gpu.sh: no CUDA device" in result.stderr
    assert not (tmp_path / "out").exists()
    assert {path: sorted(os.listdir(path)) for path in watched} == before


@pytest.mark.parametrize(("arguments", "message"), [
    ([], "usage: bash benchmarks/gpu.sh OUTDIR [--quick]"),
    (["{tmp}/out", "--fast"], "usage: bash benchmarks/gpu.sh OUTDIR [--quick]"),
    (["benchmarks/results/gpu-run"], "OUTDIR must be outside the repository"),
    (["{tmp}/full"], "must be a new or empty folder"),
    (["{tmp}/full/old.json"], "must be a new or empty folder"),
])
def test_gpu_sh_refuses_bad_arguments_before_anything_else(tmp_path, arguments, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.json").write_text("{}")
    result = _run(["bash", str(GPU_SH), *(argument.format(tmp=tmp_path) for argument in arguments)])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (ROOT / "benchmarks" / "results" / "gpu-run").exists() and not (tmp_path / "out").exists()


def test_stage_definitions_are_valid_shell(stages):
    """gpu.sh evaluates the module's output: its arrays hold exactly the stages' pytest arguments."""
    script = 'eval "$(python benchmarks/gpu_stages.py)" && printf "%s\\n" "${PYTEST_A[@]}" -- "${PYTEST_C[@]}"'
    result = _run(["bash", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [*stages.pytest_args("a"), "--", *stages.pytest_args("c")]
    assert "-n" in stages.pytest_args("a") and "-n" in stages.pytest_args("c")


def test_every_stage_a_selection_collects_a_test(stages, collected):
    for selected in stages.STAGE_A_TESTS:
        assert any(test == selected or test.startswith(selected + "[") for test in collected["a"]), selected
    assert len(set(collected["a"])) == len(collected["a"]) >= len(stages.STAGE_A_TESTS)


def test_stage_c_runs_exactly_what_stage_a_does_not(collected):
    every, in_a, in_c = set(collected["triton"]), set(collected["a"]), set(collected["c"])
    assert in_a <= every
    assert in_c == every - in_a


def test_stage_d_and_the_worked_example_cover_the_benchmark_grid(stages, collected):
    every = collected["bench"]
    assert sorted(stages.STAGE_D_BENCHMARKS + stages.STAGE_B_BENCHMARKS) == sorted(every)


def test_stage_limits_fit_the_lease(stages):
    """With every stage taking its full limit (and its kill delay), --quick still gets through a and b and a
    full run through a, b and c with time left for d; 15 s are left for the CUDA check and nvidia-smi."""
    def needed(names):
        return sum(stages.STAGES[name][1] + stages.KILL_AFTER_S for name in names) + stages.SUMMARY_S + 15

    assert needed(stages.QUICK_STAGES) <= stages.QUICK_S
    assert needed(["a", "b", "c"]) + stages.MIN_STAGE_S + stages.KILL_AFTER_S <= stages.TOTAL_S
    assert list(stages.STAGES) == ["a", "b", "c", "d"] and stages.QUICK_STAGES == ("a", "b")
    assert stages.TEST_TIMEOUT_S < stages.STAGES["a"][1] and stages.BENCH_TIMEOUT_S < stages.STAGES["d"][1]


@NO_CUDA
def test_worked_example_without_cuda_exits_2(tmp_path):
    result = _run([sys.executable, "benchmarks/gpu_worked_example.py", "--json", str(tmp_path / "worked.json")])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs a CUDA device" in result.stderr
    assert not (tmp_path / "worked.json").exists()


GRAD_BYTES = 302_000_000
WORKED = {  # forward+backward 9 ms: within 10 ms, 20x the eager reference, 2.2x the compiled one, 150 MB extra
    "device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "repeats": 10, "grad_bytes": GRAD_BYTES,
    "shape": {"L": 12, "B": 8192, "N": 8192, "D": 768, "dims": [32, 64, 128, 256, 512, 768], "dtype": "torch.bfloat16"},
    "timings": {
        "triton_forward": {"median_ms": 2.0}, "triton_backward": {"median_ms": 7.0},
        "triton_forward_backward": {"median_ms": 9.0, "tflops": 687.0},
        "reference_forward_backward": {"median_ms": 180.0},
        "reference_compile_forward_backward": {"median_ms": 20.0, "compile_s": 41.0},
        "mm_bf16": {"median_ms": 1.5, "tflops": 733.0},
    },
    "peak_extra_bytes": {"triton": GRAD_BYTES + 150_000_000},
}
BENCH = {"machine_info": {"device": "NVIDIA H200"}, "benchmarks": [
    {"group": "b65536", "stats": {"median": 0.8}, "extra_info": {"provider": "triton", "peak_extra_bytes": 10**9}},
    {"group": "single", "stats": {"median": 0.012}, "extra_info": {"provider": "triton"}},
    {"group": "single", "stats": {"median": 0.03}, "extra_info": {"provider": "torch"}},
    {"group": "mm", "stats": {"median": 0.0015}, "extra_info": {"provider": "torch.mm"}},
]}


def _summarise(tmp_path, stage_args, worked=None, bench=None):
    for name, data in (("worked.json", worked), ("bench.json", bench)):
        if data is not None:
            (tmp_path / name).write_text(json.dumps(data))
    result = _run([sys.executable, "benchmarks/gpu_summary.py", *stage_args, "--worked", str(tmp_path / "worked.json"),
                   "--bench", str(tmp_path / "bench.json"), "-o", str(tmp_path / "summary.json")])
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert 0 < len(lines) <= 40
    return result.returncode, lines, json.loads((tmp_path / "summary.json").read_text())


def test_summary_states_each_target(tmp_path):
    stage_args = ["--stage", "a", "pass", "40.5", "--stage", "b", "pass", "80", "--stage", "c", "timeout", "120",
                  "--stage", "d", "pass", "60"]
    rc, lines, summary = _summarise(tmp_path, stage_args, WORKED, BENCH)
    assert rc == 1  # stage c timed out
    met = {row["target"]: row["met"] for row in summary["targets"]}
    assert met == {
        "worked forward+backward <= 10 ms": True,
        "worked >= 10x the eager reference": True,
        "worked >= 3x torch.compile(reference)": False,
        "worked < 100 MB beyond inputs and gradients": False,
        "B=65536 forward+backward < 1000 ms": True,
    }
    assert summary["worked"]["speedup_vs_reference"] == pytest.approx(20.0)
    assert summary["worked"]["beyond_inputs_and_grads_mb"] == pytest.approx(150.0)
    printed = "\n".join(lines)
    for target, is_met in met.items():
        line = next(line for line in lines if target in line)
        assert line.split()[0] == ("met" if is_met else "NOT"), line
    assert "20.0x" in printed and "2.2x" in printed and "150.0 MB" in printed and "733 TFLOP/s" in printed
    assert any(line.startswith("stage c") and "timeout" in line and "120.0 s" in line for line in lines)
    assert lines[-1] == "gpu.sh: FAILED: c timeout"


def test_summary_of_a_partial_run(tmp_path):
    """--quick with the compile stopped at its limit: what was not measured says so; all passed: exit 0."""
    timings = {**WORKED["timings"], "reference_compile_forward_backward": {"compile_s": 50.2,
                                                                           "failure": "timeout: over 50 s"}}
    rc, lines, summary = _summarise(tmp_path, ["--stage", "a", "pass", "40", "--stage", "b", "pass", "95"],
                                    {**WORKED, "timings": timings})
    assert rc == 0
    met = {row["target"]: row["met"] for row in summary["targets"]}
    assert met["worked >= 3x torch.compile(reference)"] is None and met["B=65536 forward+backward < 1000 ms"] is None
    assert met["worked forward+backward <= 10 ms"] is True
    assert any("not measured" in line and "torch.compile(reference)" in line for line in lines)
    assert any("timeout: over 50 s" in line for line in lines)
    assert summary["grid"] == {} and lines[-1] == "gpu.sh: every stage that ran passed"


def test_summary_without_any_output(tmp_path):
    rc, lines, summary = _summarise(tmp_path, ["--stage", "a", "fail", "12.5", "--stage", "b", "fail", "3",
                                               "--stage", "c", "skipped", "0"])
    assert rc == 1
    assert all(row["met"] is None for row in summary["targets"])
    assert "worked example: not measured" in lines
    assert lines[-1] == "gpu.sh: FAILED: a fail, b fail (no time left for: c)"


def test_summary_is_cut_to_40_lines(stages):
    import gpu_summary

    grid = {f"case{i}": {"triton": {"median_ms": 1.0}} for i in range(60)}
    summary = gpu_summary.summarise([("a", "pass", 1.0)], "/nonexistent", "/nonexistent")
    lines = gpu_summary.render({**summary, "grid": grid})
    assert len(lines) == gpu_summary.MAX_LINES == 40 and "summary.json" in lines[-1]
