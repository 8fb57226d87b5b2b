#!/usr/bin/env bash
# Issue 18's GPU suite: the CUDA tests, then benchmarks/gpu_suite.py (one table; at most 8 minutes
# on one H100/H200). Run from anywhere; extra arguments go to the driver (e.g. --rounds 30).
#
#   benchmarks/gpu_suite.sh                 # CUDA tests + GPU run -> docs/results/bench_gpu_suite.json
#   benchmarks/gpu_suite.sh --out x.json    # ... the summary elsewhere
#   benchmarks/gpu_suite.sh --cpu-smoke     # the driver only, tiny sizes on the CPU (CI)
#
# Then `taildet docs` renders the committed summary into docs/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

for arg in "$@"; do
    if [ "$arg" = "--cpu-smoke" ]; then
        exec "$PYTHON" benchmarks/gpu_suite.py "$@"
    fi
done

start=$SECONDS
# a failing CUDA test does not stop the timing run (device time is scarce); the script's exit
# status reports it at the end
tests_rc=0
"$PYTHON" -m pytest -q tests/test_cuda.py tests/test_cuda_sync.py || tests_rc=$?
out=(--out docs/results/bench_gpu_suite.json)
for arg in "$@"; do
    case "$arg" in --out|--out=*) out=() ;; esac
done
"$PYTHON" benchmarks/gpu_suite.py --device cuda ${out[@]+"${out[@]}"} "$@"
echo "gpu_suite.sh: $((SECONDS - start)) s in all (budget: 480 s); CUDA tests exit status $tests_rc"
exit "$tests_rc"
