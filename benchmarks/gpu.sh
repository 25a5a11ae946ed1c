#!/usr/bin/env bash
# One call on a CUDA machine: the triton tests natively, then the GPU benchmark grid and a summary
# against the issue's targets, all under benchmarks/results/gpu-<UTC stamp>/.
#   bash benchmarks/gpu.sh                      (INF_CL_WHEEL=/path/inf_cl-*.whl to include Inf-CL)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device')" || exit 1
if [[ -n "${INF_CL_WHEEL:-}" ]]; then
    python -m pip install --no-deps "$INF_CL_WHEEL" || echo "gpu.sh: could not install $INF_CL_WHEEL; Inf-CL is skipped"
fi

out="benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

python -m pytest -q tests/test_triton.py 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

python -m pytest -q benchmarks/test_bench_gpu.py --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

if [[ -f "$out/bench.json" ]]; then
    python benchmarks/gpu_summary.py "$out/bench.json" --tests-rc "$tests_rc" -o "$out/summary.json"
fi
echo "gpu.sh: tests exit $tests_rc, benchmarks exit $bench_rc, results in $out"
exit $(( tests_rc || bench_rc ))
