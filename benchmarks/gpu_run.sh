#!/usr/bin/env bash
# One GPU run (H100/H200): install fastlora in place, time the TMA GEMM against torch.mm (gemm_check.json),
# validate every op, then the benchmark suite at the target shapes, writing the JSON result file (and logs, tables, plots) to the folder given as argument.
# DoRA rows (issue 15): validate's linear grid has a dora=1 and an lbias=1 shape, and the suite's quick set (run first,
# so the bench budget keeps it) has DoRA at 8192x4096x4096, r=16, bf16, dropout 0 and 0.1, beside the plain LoRA
# cases of the same shape.
# Installs nothing else. Finishes in under 8 minutes: each stage has a time limit, the suite has a budget
# after which it starts no new case, and the result file is rewritten after every case.
#
#   bash benchmarks/gpu_run.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-$(command -v python || command -v python3)}
FASTLORA="$PY -m fastlora.cli"  # the console script may not be on PATH (e.g. a --user install)
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
status=0

log "pip install --no-deps --no-build-isolation -e ."
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || { log "install failed"; exit 1; }

log "gemm check: the persistent TMA GEMM against torch.mm at 8192x4096x4096 bf16 (the number everything hinges on)"
timeout 90 "$PY" -m benchmarks.gemm_check "$OUT" 2>&1 | tee "$OUT/gemm_check.txt" || { log "gemm check failed or was cut"; status=1; }

log "fastlora info"
$FASTLORA info | tee "$OUT/info.txt"

log "fastlora validate (every op against float64)"
timeout 150 $FASTLORA validate -q > "$OUT/validate.txt" 2>&1
rc=$?
tail -n 3 "$OUT/validate.txt"
if [ $rc -ne 0 ]; then
    log "validate failed or was cut at its time limit (exit $rc; 124: time limit); the benchmarks still run and refuse speedups for ops that fail their check again"
    status=1
fi

log "fastlora bench (target shapes; progress below)"
timeout 290 $FASTLORA bench --out "$OUT" --budget 220 2> >(tee "$OUT/bench_progress.log" >&2) | tee "$OUT/bench_table.md"
rc=${PIPESTATUS[0]}
if [ $rc -ne 0 ]; then
    log "bench exited $rc (124: cut at its time limit; the result file keeps every finished case)"
    status=1
fi

log "report: tables and plots from $OUT"
"$PY" -m fastlora.benchmarks.report "$OUT" --plots "$OUT/plots" > "$OUT/report.md" 2>&1 || log "report failed (see $OUT/report.md)"
ls -l "$OUT"
log "done (exit $status)"
exit $status
