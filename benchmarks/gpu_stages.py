"""The stages of benchmarks/gpu.sh, most valuable first, with their time limits (seconds).

    a  a native subset of tests/test_triton.py that launches every kernel variant once (STAGE_A_TESTS)
    b  the worked example timed with CUDA events (benchmarks/gpu_worked_example.py)
    c  the rest of tests/test_triton.py
    d  benchmarks/test_bench_gpu.py without what b measures (STAGE_D_BENCHMARKS), while time remains

gpu.sh reads this module as shell variables:  eval "$(python benchmarks/gpu_stages.py)"

On a cold machine the test stages mostly compile kernel specialisations (each distinct set of constexprs,
tiles and argument attributes, 1-3 s apiece on one core): stage a needs about 45, stage c about 155 more,
b 3 and d about 3. Both test stages run under pytest-xdist so that the workers compile side by side.
"""

from __future__ import annotations

import shlex

TOTAL_S = 480  # the whole script on a cold machine
QUICK_S = 240  # with --quick, which runs QUICK_STAGES only
QUICK_STAGES = ("a", "b")
SUMMARY_S = 10  # kept for the summary after the last stage
KILL_AFTER_S = 5  # a stage still running this long after its SIGINT is killed
MIN_STAGE_S = 20  # a stage with less time left than this is skipped
STAGES = {  # name: (what it runs, time limit)
    "a": ("native test subset", 100),
    "b": ("worked example", 100),
    "c": ("rest of the triton tests", 120),
    "d": ("benchmark grid", 150),
}
TEST_TIMEOUT_S = 90  # per test in stages a and c (pytest-timeout): a test compiles up to 6 specialisations
BENCH_TIMEOUT_S = 100  # per benchmark in stage d

TRITON_TESTS = "tests/test_triton.py"
PASS_TESTS = "tests/test_passes.py"  # the pass grid of every backend: its triton cases
# One test per kernel variant: forward and both backward launches of the plain pass in fp32 (symmetric,
# aligned dims: flat k-loops; unaligned: masked segment loops) and bf16, the scale gradient with the running
# maximum, each rule flag (dot, teacher, each penalty, guide, own-group exclusion, triangle, column
# statistics) and the native-only medium shape (real tiles, bf16 and fp32).
STAGE_A_TESTS = [f"{TRITON_TESTS}::{test}" for test in (
    "test_matches_oracle[True-L2-B7-N21-D64]",
    "test_matches_oracle[False-L2-B3-N9-D100]",
    "test_low_precision_within_twice_reference_error[False-dtype0-D100]",
    "test_scale_gradient_matches_float64_autograd[100.0-True]",
    "test_gpu_medium_shape",
)] + [f"{PASS_TESTS}::{test}" for test in (
    "test_rules[triton-dot-guided-teacher-s0.05]",
    "test_rules[triton-in_batch_negatives-0.5-s20]",
    "test_rules[triton-hard_negatives-9-s100]",
    "test_rules[triton-guided-exclude-penalty-teacher-s20]",
    "test_rules[triton-triangle-s20]",
    "test_rules[triton-column_statistics-s20]",
    "test_rules[triton-triangle-exclude-column_statistics-s20]",
)]

GPU_BENCHMARKS = "benchmarks/test_bench_gpu.py"
# Measured by stage b instead (CUDA events, one compile under its own limit).
STAGE_B_BENCHMARKS = [f"{GPU_BENCHMARKS}::{test}" for test in (
    "test_forward_backward[worked-triton]",
    "test_forward_backward[worked-reference]",
    "test_forward_backward[worked-reference-compile]",
    "test_bf16_mm_rate",
)]
# The rest, in this order: the B=65536 target first, the Inductor compile last.
STAGE_D_BENCHMARKS = [f"{GPU_BENCHMARKS}::test_forward_backward[{case}]" for case in (
    "b65536-triton",
    "single-triton",
    "single-inf-cl",
    "single-torch",
    "single-reference",
    "worked-torch",
    "single-reference-compile",
)]


def selection(stage: str) -> list[str]:
    """The pytest arguments choosing the tests of stage a, c or d."""
    if stage == "a":
        return list(STAGE_A_TESTS)
    if stage == "c":
        # test_triton.py whole (its module name matches) and the grid's triton cases.
        return [TRITON_TESTS, PASS_TESTS, "-k", "triton",
                *(arg for test in STAGE_A_TESTS for arg in ("--deselect", test))]
    if stage == "d":
        return list(STAGE_D_BENCHMARKS)
    raise ValueError(f"stage {stage!r} runs no tests")


def pytest_args(stage: str) -> list[str]:
    """The pytest arguments of stage a, c or d: how it runs, then its selection."""
    timeout = BENCH_TIMEOUT_S if stage == "d" else TEST_TIMEOUT_S
    parallel = [] if stage == "d" else ["-n", "auto"]  # benchmarks run alone on the GPU
    return ["-q", "-p", "no:cacheprovider", *parallel, f"--timeout={timeout}", *selection(stage)]


def shell() -> str:
    """Shell assignments of everything gpu.sh needs."""
    def array(values):
        return "(" + " ".join(shlex.quote(value) for value in values) + ")"

    lines = [f"{name}={value}" for name, value in (
        ("TOTAL_S", TOTAL_S), ("QUICK_S", QUICK_S), ("SUMMARY_S", SUMMARY_S), ("KILL_AFTER_S", KILL_AFTER_S),
        ("MIN_STAGE_S", MIN_STAGE_S))]
    lines.append(f"QUICK_STAGES={array(QUICK_STAGES)}")
    lines += [f"LIMIT_{name.upper()}={limit}" for name, (_, limit) in STAGES.items()]
    lines += [f"PYTEST_{name.upper()}={array(pytest_args(name))}" for name in ("a", "c", "d")]
    return "\n".join(lines)


if __name__ == "__main__":
    print(shell())
