"""benchmarks/gate.py, the regression gate, on small pytest-benchmark JSON files written here (no benchmark runs).

The medians are chosen by the test: a planted slow-down must fail the gate, a small one must pass, a baseline of
another suite or another machine must not be used, and a machine without a baseline is told how to record one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

GATE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gate.py"


@pytest.fixture(scope="module")
def gate():
    spec = importlib.util.spec_from_file_location("m2d_benchmark_gate", GATE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


AMD = {"cpu": {"brand_raw": "AMD EPYC"}, "cpu_threads": 2, "torch": "2.13.0+cpu", "device": "cpu (x86_64)"}
INTEL = {"cpu": {"brand_raw": "Intel(R) Xeon(R) Processor"}, "cpu_threads": 2, "torch": "2.13.0+cpu",
         "device": "cpu (x86_64)"}
SHAPE = "L7-B256-N512-D384"


def write_run(path: Path, machine: dict, when: str, medians: dict[tuple[str, str], float]) -> Path:
    """A pytest-benchmark JSON: ``medians`` maps (suite file, provider) to seconds, all at one shape."""
    benchmarks = []
    for (suite, provider), median in medians.items():
        test = "test_torch_mm_ceiling" if provider == "torch.mm" else "test_forward_backward"
        param = SHAPE if provider == "torch.mm" else f"{provider}-{SHAPE}"
        benchmarks.append({"group": SHAPE, "name": f"{test}[{param}]",
                           "fullname": f"benchmarks/{suite}::{test}[{param}]",
                           "extra_info": {"provider": provider}, "stats": {"median": median, "mean": median}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine_info": machine, "datetime": when, "benchmarks": benchmarks}))
    return path


LOSS, CPP, OPTIONS = "test_bench_loss.py", "test_bench_cpp.py", "test_bench_options.py"


def baseline(storage: Path, machine=AMD, cpp=0.100, mm=0.020, when="2026-11-22T10:00:00") -> Path:
    return write_run(storage / "baselines" / "x" / f"{when}.json", machine, when,
                     {(LOSS, "cpp"): cpp, (LOSS, "torch"): 0.300, (CPP, "torch.mm"): mm})


def new_run(tmp_path: Path, machine=AMD, cpp=0.100, mm=0.020) -> Path:
    return write_run(tmp_path / "new" / "run.json", machine, "2026-12-04T10:00:00",
                     {(LOSS, "cpp"): cpp, (LOSS, "torch"): 0.300, (CPP, "torch.mm"): mm})


def run_gate(gate, capsys, *argv) -> tuple[int, str]:
    status = gate.main(["compare", *map(str, argv)])
    return status, capsys.readouterr().out


def test_a_planted_slowdown_fails_the_gate(gate, tmp_path, capsys):
    storage = tmp_path / "results"
    baseline(storage, cpp=0.100)
    status, out = run_gate(gate, capsys, new_run(tmp_path, cpp=0.130), "--storage", storage)
    assert status == 1
    assert f"FAIL test_bench_loss.py::test_forward_backward[cpp-{SHAPE}]: 100.000ms -> 130.000ms (+30.0 %" in out
    # torch.mm did not move, so cpp / torch.mm (5 -> 6.5) fails too.
    assert f"FAIL {SHAPE}: cpp / torch.mm: 5.000 -> 6.500 (+30.0 %" in out
    assert f"ok   test_bench_loss.py::test_forward_backward[torch-{SHAPE}]" in out


def test_a_slowdown_within_the_threshold_passes(gate, tmp_path, capsys):
    storage = tmp_path / "results"
    baseline(storage, cpp=0.100)
    status, out = run_gate(gate, capsys, new_run(tmp_path, cpp=0.115), "--storage", storage)
    assert status == 0
    assert "passed: 3 median(s) and 2 ratio(s) within their limits" in out
    # A stricter threshold turns the same +15 % into a failure.
    status, _ = run_gate(gate, capsys, new_run(tmp_path, cpp=0.115), "--storage", storage, "--threshold", "0.1")
    assert status == 1


def test_a_newer_run_of_another_suite_is_not_the_baseline(gate, tmp_path, capsys):
    """pytest-benchmark's own compare took the latest file of the folder: the options suite, no common test."""
    storage = tmp_path / "results"
    baseline(storage, cpp=0.100, when="2026-11-22T10:00:00")
    write_run(storage / "Linux-CPython-3.11-64bit" / "0024_options.json", AMD, "2026-11-23T06:55:00",
              {(OPTIONS, "cpp"): 0.050})
    status, out = run_gate(gate, capsys, new_run(tmp_path, cpp=0.194), "--storage", storage)
    assert status == 1 and "baseline 2026-11-22T10:00:00.json" in out and "0024_options" not in out


def test_no_baseline_for_this_machine_says_how_to_record_one(gate, tmp_path, capsys):
    storage = tmp_path / "results"
    baseline(storage, machine=AMD, cpp=0.050)  # twice as fast, but on another CPU: not comparable
    status, out = run_gate(gate, capsys, new_run(tmp_path, machine=INTEL, cpp=0.100, mm=0.020), "--storage", storage)
    key = "intel-r-xeon-r-processor_2threads_torch-2.13.0+cpu"
    assert f"no baseline of {LOSS} for this machine ({key}); medians are not compared" in out
    assert f"python benchmarks/gate.py record --storage {storage}" in out
    assert "stored baselines of test_bench_loss.py are for: amd-epyc_2threads_torch-2.13.0+cpu" in out
    assert "medians (same machine)" not in out
    # The side-by-side ratio is compared with the other machine's at the looser threshold:
    # cpp / torch.mm 2.5 -> 5.0 is a regression whatever the CPU.
    assert status == 1 and f"FAIL {SHAPE}: cpp / torch.mm: 2.500 -> 5.000" in out and "limit +35 %" in out


def test_without_any_baseline_it_passes_unless_one_is_required(gate, tmp_path, capsys):
    storage = tmp_path / "results"
    storage.mkdir()
    status, out = run_gate(gate, capsys, new_run(tmp_path), "--storage", storage)
    assert status == 0 and "no baseline of test_bench_cpp.py for this machine" in out
    status, out = run_gate(gate, capsys, new_run(tmp_path), "--storage", storage, "--require-baseline")
    assert status == 1 and "FAILED: no baseline for test_bench_cpp.py, test_bench_loss.py" in out


@pytest.mark.parametrize("change", [{"cpu_threads": 1}, {"torch": "2.11.0+cpu"}])
def test_another_thread_count_or_torch_version_is_another_machine(gate, tmp_path, capsys, change):
    storage = tmp_path / "results"
    baseline(storage, machine=AMD | change, cpp=0.050, mm=0.005)
    status, out = run_gate(gate, capsys, new_run(tmp_path, cpp=0.100, mm=0.010), "--storage", storage)
    assert "no baseline of test_bench_loss.py for this machine" in out and "medians (same machine)" not in out
    assert status == 0  # cpp / torch.mm is 10 in both runs


def test_non_benchmark_json_in_the_storage_is_ignored(gate, tmp_path, capsys):
    storage = tmp_path / "results"
    baseline(storage, cpp=0.100)
    (storage / "scale-run.json").write_text(json.dumps({"rows": [1, 2]}))
    (storage / "broken.json").write_text("{")
    status, out = run_gate(gate, capsys, new_run(tmp_path, cpp=0.100), "--storage", storage)
    assert status == 0 and "passed: 3 median(s)" in out


def test_a_run_on_a_busy_machine_is_named_as_such(gate, tmp_path, capsys):
    storage = tmp_path / "results"
    baseline(storage, machine=AMD | {"cpu": {"brand_raw": "AMD EPYC", "count": 2}, "load_average": [5.1, 5.8, 6.0]})
    status, out = run_gate(gate, capsys, new_run(tmp_path, machine=AMD | {"cpu": {"brand_raw": "AMD EPYC", "count": 2},
                                                                            "load_average": [0.3, 0.2, 0.1]}),
                           "--storage", storage)
    assert status == 0
    assert "the baseline 2026-11-22T10:00:00.json ran on a busy machine (load average 5.10 on 2 cores)" in out
    assert "this run ran on a busy machine" not in out
