#!/usr/bin/env bash
# One call on a CUDA machine with a short lease: the stages of benchmarks/gpu_stages.py, most valuable
# first, each under `timeout` (a stage that fails or times out is recorded and the next one runs), within
# TOTAL_S (QUICK_S with --quick: QUICK_STAGES only). Everything goes to OUTDIR, at most 8 files and no
# folders; the repository is left as it was. The last lines printed are the summary (benchmarks/gpu_summary.py,
# also OUTDIR/summary.json); the exit status is non-zero when a stage failed or timed out.
#   bash benchmarks/gpu.sh OUTDIR [--quick]
set -uo pipefail
usage="usage: bash benchmarks/gpu.sh OUTDIR [--quick]"
if (( $# < 1 || $# > 2 )) || [[ -z $1 || ( $# == 2 && $2 != --quick ) ]]; then
    echo "$usage" >&2
    exit 2
fi
out=$(realpath -m -- "$1")  # OUTDIR is relative to the caller's directory
quick=$(( $# == 2 ))
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
if [[ $out/ == "$repo"/* ]]; then
    echo "gpu.sh: OUTDIR must be outside the repository ($repo)" >&2
    exit 2
fi
if [[ -e $out ]] && { [[ ! -d $out ]] || [[ -n $(ls -A -- "$out") ]]; }; then
    echo "gpu.sh: OUTDIR $out must be a new or empty folder" >&2
    exit 2
fi
# No bytecode caches in the repository (pytest's cache is off below with -p no:cacheprovider).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
timeout 120 python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
    'gpu.sh: no CUDA device (torch.cuda.is_available() is False)')" || exit 1
stages_sh=$(python benchmarks/gpu_stages.py) || exit 1
eval "$stages_sh"

mkdir -p -- "$out" || exit 1
timeout 30 nvidia-smi > "$out/nvidia-smi.txt" 2>&1
deadline=$(( quick ? QUICK_S : TOTAL_S ))  # seconds since the script started ($SECONDS)
records=()  # --stage NAME STATUS SECONDS for the summary

# stage NAME LIMIT LOG COMMAND...: COMMAND under timeout (its limit cut to the time left), output to OUTDIR/LOG.
stage() {
    local name=$1 limit=$2 log=$out/$3 status
    shift 3
    if (( quick )) && [[ " ${QUICK_STAGES[*]} " != *" $name "* ]]; then
        return
    fi
    local left=$(( deadline - SECONDS - SUMMARY_S - KILL_AFTER_S ))
    (( limit > left )) && limit=$left
    if (( limit < MIN_STAGE_S )); then
        echo "gpu.sh: stage $name skipped: ${left} s left"
        records+=(--stage "$name" skipped 0)
        return
    fi
    echo "gpu.sh: stage $name, limit $limit s, output in $log"
    local start rc seconds
    start=$(date +%s.%N)
    timeout -s INT -k "$KILL_AFTER_S" "$limit" "$@" > "$log" 2>&1
    rc=$?
    seconds=$(awk -v start="$start" -v end="$(date +%s.%N)" 'BEGIN { printf "%.1f", end - start }')
    case $rc in
        0) status=pass ;;
        124 | 137) status=timeout ;;
        *) status=fail ;;
    esac
    echo "gpu.sh: stage $name $status (exit $rc) after $seconds s"
    if [[ $status != pass ]]; then
        tail -n 8 "$log" | cut -c 1-200
    fi
    records+=(--stage "$name" "$status" "$seconds")
}

stage a "$LIMIT_A" stage_a_tests.log python -m pytest "${PYTEST_A[@]}"
stage b "$LIMIT_B" stage_b.log python benchmarks/gpu_worked_example.py --json "$out/stage_b_worked.json"
stage c "$LIMIT_C" stage_c_tests.log python -m pytest "${PYTEST_C[@]}"
# pytest-benchmark wants a storage folder even when it stores nothing there: OUTDIR, not the repository.
stage d "$LIMIT_D" stage_d.log python -m pytest "${PYTEST_D[@]}" \
    --benchmark-json="$out/stage_d_bench.json" --benchmark-storage="file://$out"

timeout -k "$KILL_AFTER_S" $(( SUMMARY_S - KILL_AFTER_S )) python benchmarks/gpu_summary.py "${records[@]}" \
    --worked "$out/stage_b_worked.json" --bench "$out/stage_d_bench.json" -o "$out/summary.json"
rc=$?
if [[ ! -f $out/summary.json ]]; then  # no summary: the stages at least
    echo "gpu.sh: the summary failed (exit $rc); the stages:"
    printf '  %s %s %s %s\n' "${records[@]}"
    exit 1
fi
exit $rc
