#!/usr/bin/env bash
# The GPU check, sized for 8 minutes on one H100 (run from the repository root, venv built by `make venv`):
#   1. batched == serial, token for token, on full-size random weights (bench.engine --check);
#   2. the engine bench at 1, 16 and 64 conversations (steps/s, rows per step, first audio);
#   3. the server under load (bench.gpu) at 1 and 32 conversations.
# Each part has its own time limit so a hang in one still leaves the others' figures. JSON results go to
# ${OUT:-bench/results/gpu-check}; the full-size checkpoint is built once into models/random-full.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${OUT:-bench/results/gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "available", torch.cuda.is_available(), "transformers", transformers.__version__)'
status=0
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  timeout "$limit" "$@" || { echo "!! $name failed (exit $?)"; status=1; }
  echo "== $name took $((SECONDS - started)) s"
}
part "checkpoint" 90 "$PY" -c 'from bench.gpu import ensure_model; ensure_model("full", None)'
part "batched == serial (full size, fp32, greedy)" 90 "$PY" -m bench.engine --device cuda --check
part "engine bench 1/16/64" 150 "$PY" -m bench.engine --device cuda --dtype bf16 --concurrency 1,16,64 \
  --max-batch 64 --serial-max 16 --json "$out/engine.json"
part "server load 1/32" 150 "$PY" -m bench.gpu --concurrency 1,32 --turns 1 --json "$out/server.json"
exit $status
