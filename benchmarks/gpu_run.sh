#!/usr/bin/env bash
# One GPU run (H100/H200): install fastlora in place, time the TMA GEMM against torch.mm (gemm_check.json),
# validate every op, check CUDA graphs and torch.compile (graphs_check.json), then the benchmark suite at the target
# shapes (QLoRA as a stage of its own), writing the JSON result file (and logs, tables, plots) to the folder given as argument.
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
timeout 60 "$PY" -m fastlora.benchmarks.gemm_check "$OUT" 2>&1 | tee "$OUT/gemm_check.txt" || { log "gemm check failed or was cut"; status=1; }

log "fastlora info"
$FASTLORA info | tee "$OUT/info.txt"

log "fastlora validate (every op against float64)"
timeout 120 $FASTLORA validate -q > "$OUT/validate.txt" 2>&1
rc=$?
tail -n 3 "$OUT/validate.txt"
if [ $rc -ne 0 ]; then
    log "validate failed or was cut at its time limit (exit $rc; 124: time limit); the benchmarks still run and refuse speedups for ops that fail their check again"
    status=1
fi

log "graphs check: host-bound M=512 vs PEFT, CUDA graph capture and torch.compile(reduce-overhead) vs eager, dropout masks across replays, checkpointing"
timeout 90 "$PY" -m fastlora.benchmarks.graphs_check "$OUT" 2>&1 | tee "$OUT/graphs_check.txt" || { log "graphs check failed or was cut (see graphs_check.json)"; status=1; }

log "fastlora bench (target shapes but QLoRA's; progress below)"
LAYERS_BUT_QLORA=$("$PY" -c "from fastlora.benchmarks.suite import LAYERS; print(','.join(l for l in LAYERS if l != 'linear4bit'))")
timeout 150 $FASTLORA bench --layer "$LAYERS_BUT_QLORA" --out "$OUT" --budget 105 2> >(tee "$OUT/bench_progress.log" >&2) | tee "$OUT/bench_table.md"
rc=${PIPESTATUS[0]}
if [ $rc -ne 0 ]; then
    log "bench exited $rc (124: cut at its time limit; the result file keeps every finished case)"
    status=1
fi

log "fastlora bench --layer linear4bit (QLoRA: M 16..16384, K=N=4096 and 4096x14336; fastlora vs PEFT's bnb layer vs dequantize + cuBLAS)"
mkdir -p "$OUT/qlora"
timeout 50 $FASTLORA bench --layer linear4bit --out "$OUT/qlora" --budget 40 2> >(tee "$OUT/qlora_progress.log" >&2) | tee "$OUT/qlora_table.md"
rc=${PIPESTATUS[0]}
if [ $rc -ne 0 ]; then
    log "QLoRA bench exited $rc (124: cut at its time limit; the result file keeps every finished case)"
    status=1
fi

log "report: tables and plots from $OUT"
"$PY" -m fastlora.benchmarks.report "$OUT" --plots "$OUT/plots" > "$OUT/report.md" 2>&1 || log "report failed (see $OUT/report.md)"
ls -l "$OUT"
log "done (exit $status)"
exit $status
